"""ClientApp (Flower Message API): local FedSGD / FedAvg training on the client's shard, evaluation.

The reply carries exactly what a real client sends — one ArrayRecord (gradient or weights) and one
MetricRecord (num-examples and protocol metadata), plus shared features when the scenario has clients
share them — and the simulation's evaluation-only record of the batches it used, which the curious
strategy strips before observing (fl_sim.federation.protocol).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable

from defenses import DefenseContext, Stage, build_all, defend, of_stage
from fl_sim.base.streams import (
    CLIENT_MODS,
    CLIENT_TRAINING,
    DP_SGD_NOISE,
    FEATURE_NOISE,
    UPDATE_NOISE,
    numpy_global,
)
from fl_sim.data.images import ImageSet
from fl_sim.federation.protocol import (
    EVALUATION_RECORD,
    FEATURES_RECORD,
    client_metrics,
    evaluation_record,
    features_record,
)
from fl_sim.federation.secagg import is_legacy_fit, legacy_fit
from fl_sim.federation.setup import Federation, prepare
from fl_sim.observation import SharedFeatures
from fl_sim.observation.features import penultimate, prune
from fl_sim.scenario import Scenario, load_scenario, scenario_from_toml
from fl_sim.training import LocalTraining, evaluate, local_update

CLIENT_ID_QUERY = "query.client_id"


def build_client_app(scenario: Scenario | None = None, federation: Federation | None = None) -> ClientApp:
    """A ClientApp for ``scenario`` (and its ``federation``, if already built in this process); with None it
    reads the scenario from the run config (``flwr run``, fl-sim deploy). The federation is built on first
    use and kept for the scenario it belongs to."""
    app = ClientApp()
    held: dict[str, Any] = {"scenario": scenario, "federation": federation}

    def current(context: Context) -> Scenario:
        return scenario if scenario is not None else scenario_from_context(context)

    def federation_of(scenario_now: Scenario) -> Federation:
        if held["federation"] is None or held["scenario"] != scenario_now:
            held["scenario"], held["federation"] = scenario_now, prepare(scenario_now)
        return held["federation"]

    @app.query("client_id")
    def client_id(msg: Message, context: Context) -> Message:
        return Message(RecordDict({"metrics": MetricRecord({"client-id": _client(context)})}), reply_to=msg)

    def message_defenses(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """The scenario's defenses that are Flower mods (LocalDpMod, secaggplus_mod) around this train call."""
        scenario_now = current(context)
        handler = call_next
        for defense in reversed(of_stage(build_all(scenario_now.defenses), Stage.MESSAGE, Stage.PROTOCOL)):
            handler = partial(defense.mod(), call_next=handler)
        if handler is call_next:
            return handler(msg, context)
        server_round = int(msg.metadata.group_id) if msg.metadata.group_id.isdigit() else 0  # Flower's round
        with numpy_global(CLIENT_MODS.seed(scenario_now.seed, _client(context), server_round)):
            return handler(msg, context)

    def local_round(context: Context, global_state: dict[str, torch.Tensor], config: Any
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[np.ndarray, ...], SharedFeatures | None]:
        """This client's defended update, its metrics, the batches it used, its shared features."""
        scenario_now = current(context)  # read once: with `flwr run` it comes from the run-config file
        fed, client = federation_of(scenario_now), _client(context)
        server_round = int(config["server-round"])
        plan = LocalTraining.from_record(config)
        model = fed.model()
        model.load_state_dict(global_state)
        batches = fed.batches(client, server_round, plan)
        key = (fed.scenario.seed, client, server_round)
        torch.manual_seed(CLIENT_TRAINING.seed(*key))
        defenses = build_all(scenario_now.defenses)
        update, loss = defended_update(fed, defenses, model, fed.data.train, batches, plan, global_state,
                                       DP_SGD_NOISE.seed(*key), torch.Generator().manual_seed(UPDATE_NOISE.seed(*key)))
        shared = None
        if scenario_now.features.share:  # pruned penultimate features of the batch under the received model
            shared = share_features(_eval_copy(fed, global_state), fed, batches[0], scenario_now.features.prune,
                                    defenses, torch.Generator().manual_seed(FEATURE_NOISE.seed(*key)))
        metrics = client_metrics(client, batches, loss, plan, len(fed.shards[client]), fed.poisson)
        return update, metrics, tuple(batches), shared

    @app.train(mods=[message_defenses])
    def train(msg: Message, context: Context) -> Message:
        if is_legacy_fit(msg):  # SecAgg+ runs on Flower's legacy workflow: FitIns in, FitRes out, nothing else
            template = federation_of(current(context)).template.state_dict()
            return legacy_fit(msg, template, lambda state, config: local_round(context, state, config)[:2])
        update, metrics, batches, shared = local_round(context, msg.content["arrays"].to_torch_state_dict(),
                                                       msg.content["config"])
        content = RecordDict({"arrays": ArrayRecord(update), "metrics": MetricRecord(metrics),
                              EVALUATION_RECORD: evaluation_record(batches)})
        if shared is not None:
            content[FEATURES_RECORD] = features_record(shared)
        return Message(content, reply_to=msg)

    @app.evaluate()
    def evaluate_holdout(msg: Message, context: Context) -> Message:
        fed, client = federation_of(current(context)), _client(context)
        model = fed.model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss, acc, n = evaluate(model, fed.data.train, fed.holdouts[client], fed.norm, fed.device)
        return Message(RecordDict({"metrics": MetricRecord({"num-examples": n, "eval-loss": loss, "eval-acc": acc})}),
                       reply_to=msg)

    return app


def defended_update(fed: Federation, defenses: list[Any], model: torch.nn.Module, pool: ImageSet,
                    batches: list[np.ndarray], plan: LocalTraining, global_state: dict[str, torch.Tensor],
                    dp_seed: int, noise: torch.Generator) -> tuple[dict[str, torch.Tensor], float]:
    """What a client replies after training ``model`` (holding ``global_state``) on ``batches`` of ``pool``: its
    update, after the training-stage (DP-SGD, seeded ``dp_seed``) and update-stage defenses (drawing from
    ``noise``), and its mean loss. The message- and protocol-stage defenses are Flower mods around the reply."""
    param_names = {n for n, _ in model.named_parameters()}
    trainer = next(iter(of_stage(defenses, Stage.TRAINING)), None)
    if trainer is not None:  # dp-sgd: the defense is the local optimisation itself
        update, loss = trainer.local_update(model, pool, batches, plan, fed.norm, fed.device, dp_seed)
    else:
        update, loss = local_update(model, pool, batches, plan, fed.norm, fed.device)
    if defenses:
        x, y = pool.batch(batches[0])
        ctx = DefenseContext(global_model=lambda: _eval_copy(fed, global_state),
                             inputs=fed.norm.normalize(x.to(fed.device)), labels=y,
                             generator=noise, protocol=plan.protocol)
        update = defend(defenses, {k: v.cpu() for k, v in update.items()},
                        {k: v.cpu() for k, v in global_state.items()}, param_names, ctx)
    return update, loss


def share_features(model: torch.nn.Module, fed: Federation, batch: np.ndarray, ratio: float,
                   defenses: list[Any], generator: torch.Generator, pool: ImageSet | None = None) -> SharedFeatures:
    """Features of ``batch`` (of ``pool``, default the training split) under the global model, pruned to
    ``ratio``, then the feature-stage defenses."""
    x, _ = (pool or fed.data.train).batch(batch)
    with torch.no_grad():
        shared = prune(penultimate(model, fed.norm.normalize(x.to(fed.device))).cpu(), ratio)
    for defense in of_stage(defenses, Stage.FEATURES):
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
    config = context.run_config
    overrides = [s for s in str(config.get("overrides", "")).split(";") if s.strip()]
    if text := str(config.get("scenario-text", "")):
        return scenario_from_toml(text, overrides)
    path = Path(str(config["scenario"]))
    if not path.is_absolute() and not path.exists():
        path = Path(__file__).resolve().parents[2] / path  # relative to the app folder (a checkout)
    return load_scenario(path, overrides)


app = build_client_app()
