"""ClientApp (Flower Message API): local FedSGD / FedAvg training on the client's shard, evaluation.

The reply carries exactly what a real client sends — one ArrayRecord (gradient or weights) and
one MetricRecord (num-examples and protocol metadata) — plus the simulation's evaluation-only
Secret record (the dataset indices used), which the curious strategy strips before observing.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from defenses import DefenseContext, build_defense, defend
from fl_sim.features import FEATURES_RECORD, SharedFeatures, penultimate, prune
from fl_sim.federation import Federation, prepare
from fl_sim.scenario import Scenario
from fl_sim.secagg import is_legacy_fit, legacy_fit
from fl_sim.secret import SECRET_RECORD, Secret
from fl_sim.training import LocalTraining, evaluate, local_update

CLIENT_ID_QUERY = "query.client_id"


def build_client_app(scenario: Scenario | None = None) -> ClientApp:
    """A ClientApp for ``scenario``; with None it reads ``run_config['scenario']`` (a path, for `flwr run`)."""
    app = ClientApp()

    def current(context: Context) -> Scenario:
        return scenario if scenario is not None else scenario_from_context(context)

    def federation(context: Context) -> Federation:
        return prepare(current(context))

    @app.query("client_id")
    def client_id(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"client-id": _client(context)})}), reply_to=msg)

    def message_defenses(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """The scenario's defenses that are Flower mods (LocalDpMod, secaggplus_mod) around this train call."""
        handler = call_next
        for defense in reversed([build_defense(d.name, d.params) for d in current(context).defenses]):
            if hasattr(defense, "mod"):
                handler = partial(defense.mod(), call_next=handler)
        return handler(msg, context)

    def local_round(context: Context, global_state: dict[str, torch.Tensor], config: Any
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], Secret, SharedFeatures | None]:
        """This client's defended update, its metrics, the Secret (the batches it used), shared features."""
        scenario_now = current(context)  # read once: with `flwr run` it comes from the run-config file
        fed, client = prepare(scenario_now), _client(context)
        server_round = int(config["server-round"])
        plan = LocalTraining.from_record(config)
        model = fed.model()
        model.load_state_dict(global_state)
        param_names = {n for n, _ in model.named_parameters()}
        batches = fed.batches(client, server_round, plan)
        seeds = np.random.SeedSequence([fed.scenario.seed, client, server_round]).generate_state(2)
        torch.manual_seed(int(seeds[0]))
        defenses = [build_defense(d.name, d.params) for d in scenario_now.defenses]
        trainer = next((d for d in defenses if getattr(d, "stage", "") == "training"), None)
        if trainer is not None:  # dp-sgd: the defense is the local optimisation itself
            update, loss = trainer.local_update(model, fed.data.train, batches, plan, fed.norm, fed.device,
                                                int(seeds[1]))
        else:
            update, loss = local_update(model, fed.data.train, batches, plan, fed.norm, fed.device)
        if defenses:
            x, y = fed.data.train.batch(batches[0])
            ctx = DefenseContext(global_model=lambda: _eval_copy(fed, global_state),
                                 inputs=fed.norm.normalize(x.to(fed.device)), labels=y,
                                 generator=torch.Generator().manual_seed(int(seeds[1])), protocol=plan.protocol)
            update = defend(defenses, {k: v.cpu() for k, v in update.items()},
                            {k: v.cpu() for k, v in global_state.items()}, param_names, ctx)
        shared = None
        if scenario_now.features.share:  # pruned penultimate features of the batch under the received model
            shared = share_features(_eval_copy(fed, global_state), fed, batches[0], scenario_now, defenses,
                                    torch.Generator().manual_seed(int(seeds[1]) + 1))
        used = sum(len(b) for b in batches)
        metrics = {"num-examples": used if plan.protocol == "fedsgd" else len(fed.shards[client]),
                   "train-loss": loss, "client-id": client, "batch-size": len(batches[0]),
                   "local-steps": len(batches), "lr": plan.lr}
        return update, metrics, Secret(server_round, client, tuple(batches)), shared

    @app.train(mods=[message_defenses])
    def train(msg: Message, context: Context) -> Message:
        if is_legacy_fit(msg):  # SecAgg+ runs on Flower's legacy workflow: FitIns in, FitRes out, no Secret
            template = federation(context).template.state_dict()
            return legacy_fit(msg, template, lambda state, config: local_round(context, state, config)[:2])
        update, metrics, secret, shared = local_round(context, msg.content["arrays"].to_torch_state_dict(),
                                                      msg.content["config"])
        content = RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metrics),
                              SECRET_RECORD: secret.to_record()})
        if shared is not None:
            content[FEATURES_RECORD] = ArrayRecord({"values": shared.values, "indices": shared.indices})
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_holdout(msg: Message, context: Context) -> Message:
        fed, client = federation(context), _client(context)
        model = fed.model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss, acc, n = evaluate(model, fed.data.train, fed.holdouts[client], fed.norm, fed.device)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "eval-loss": loss, "eval-acc": acc})}),
                       reply_to=msg)

    return app


def share_features(model: torch.nn.Module, fed: Federation, batch: np.ndarray, scenario: Scenario,
                   defenses: list[Any], generator: torch.Generator) -> SharedFeatures:
    """Features of ``batch`` under the global model, pruned as the scenario says, then feature defenses."""
    x, _ = fed.data.train.batch(batch)
    with torch.no_grad():
        shared = prune(penultimate(model, fed.norm.normalize(x.to(fed.device))).cpu(), scenario.features.prune)
    for defense in defenses:
        if getattr(defense, "stage", "") == "features":
            shared = defense.apply_features(shared, generator)
    return shared


def _eval_copy(fed: Federation, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = fed.model()
    model.load_state_dict(state)
    return model.eval()


def _client(context: Context) -> int:
    return int(context.node_config["partition-id"])


def scenario_from_context(context: Context) -> Scenario:
    """The scenario of a `flwr run`: the TOML text in run-config ``scenario-text`` (what ``fl-sim deploy``
    sends, so no file has to exist where the apps run) or the file ``scenario``, relative to the working
    directory or the app folder; ``overrides`` is a ';'-separated list of section.key=value."""
    from pathlib import Path

    from fl_sim.scenario import load_scenario, scenario_from_toml

    config = context.run_config
    overrides = [s for s in str(config.get("overrides", "")).split(";") if s.strip()]
    if text := str(config.get("scenario-text", "")):
        return scenario_from_toml(text, overrides)
    path = Path(str(config["scenario"]))
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[1] / path  # relative to the app folder (a checkout)
    return load_scenario(path, overrides)


app = build_client_app()
