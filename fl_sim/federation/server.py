"""ServerApp: the federation's round loop with the CuriousStrategy, central test evaluation, run store."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from defenses import ADVERSARY, Releases, accountants, secure_aggregation
from fl_sim.base.logs import run_log
from fl_sim.engines import ENGINES
from fl_sim.federation.client import CLIENT_ID_QUERY, build_client_app, scenario_from_context
from fl_sim.federation.protocol import ObservedModel, RoundRecord
from fl_sim.federation.setup import Federation, device_name, prepare
from fl_sim.federation.strategy import CuriousStrategy, honest_fedavg
from fl_sim.leakage.model_attacks import InversionRunner
from fl_sim.leakage.observation_attacks import LeakageRunner
from fl_sim.observation import Observation
from fl_sim.report import report_after_run
from fl_sim.scenario import Scenario
from fl_sim.store import RunStore
from fl_sim.training import LocalTraining, evaluate

log = logging.getLogger("fl_sim")
RoundHook = Callable[[int, list[Observation]], None]


def discover_clients(grid: Grid, num_clients: int, timeout: float = 600.0, simulation_grace: float = 10.0,
                     log_every: float = 10.0) -> dict[int, int]:
    """node id → client id, asking every connected node (the server knows who its clients are). Waits for
    ``num_clients`` nodes, logging the count every ``log_every`` s; a Flower simulation (its nodes all exist from
    the start) with too few gives up after ``simulation_grace`` s, saying how to set their number."""
    from flwr.superlink.grid import InMemoryGrid

    started = logged = time.monotonic()
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        now = time.monotonic()
        if isinstance(grid, InMemoryGrid) and now - started > simulation_grace:
            message = (f"the simulation has {len(nodes)} SuperNodes but federation.num_clients = {num_clients}: run "
                       f"flwr run . --federation-config \"num-supernodes={num_clients}\" (or set options.num-supernodes"
                       f" = {num_clients} under [superlink.local] in $FLWR_HOME/config.toml, default ~/.flwr)")
            log.error(message)
            raise RuntimeError(message)
        if now - started > timeout:
            raise RuntimeError(f"only {len(nodes)} of {num_clients} clients connected within {timeout:.0f} s")
        if now - logged >= log_every:
            log.info("waiting for SuperNodes: %d of %d connected after %.0f s", len(nodes), num_clients, now - started)
            logged = now
        time.sleep(0.5)
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=CLIENT_ID_QUERY) for n in nodes]
    mapping = {}
    for reply in grid.send_and_receive(msgs, timeout=timeout):
        if reply.has_error():
            raise RuntimeError(f"node {reply.metadata.src_node_id} failed to identify: {reply.error.reason}")
        mapping[reply.metadata.src_node_id] = int(reply.content["metrics"]["client-id"])
    return mapping


class RoundEnd:
    """What the server does once a round's model is aggregated: test it, attack the round's observations,
    persist the round (after which it survives a crash), report progress."""

    def __init__(self, scenario: Scenario, fed: Federation, store: RunStore, on_round_end: RoundHook | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.fed = fed
        self.store, self.on_round_end, self.progress = store, on_round_end, progress
        self.model = self.fed.model()
        self.leakage = LeakageRunner(scenario, self.fed, store)
        self.inversion = InversionRunner(scenario, self.fed, store)
        self.participation = store.participation()  # rounds each client was sampled in, resumed runs included
        self.accountants = accountants(scenario.defenses)
        self._budgets: dict[Releases, list[dict[str, Any]]] = {}  # clients with equal releases share a budget
        self.started = time.perf_counter()

    def observed(self, record: RoundRecord) -> None:
        """The round's observations and (apart, for the leakage stage) the batches behind them, as soon as the
        server has them."""
        self.store.record_observations(record.server_round, record.global_state, record.observations)
        self.leakage.keep(record.server_round, record.batches)
        for failure in record.failures:
            log.warning("round %d: client failed: %s", record.server_round, failure)

    def account(self) -> None:
        """privacy.csv: each client's budget against the curious server, for the rounds it took part in so far."""
        if not self.accountants:
            return
        rows = []
        for client in range(len(self.fed.shards)):
            releases = self.fed.releases(client, self.participation[client])
            if releases not in self._budgets:
                self._budgets[releases] = [{"defense": name} | asdict(releases)
                                           | asdict(defense.budget(releases)) | {"adversary": ADVERSARY}
                                           for name, defense in self.accountants]
            rows += [{"client": client} | row for row in self._budgets[releases]]
        self.store.write_privacy(rows)

    def test(self, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        self.model.load_state_dict(state)
        loss, acc, _ = evaluate(self.model, self.fed.data.test, None, self.fed.norm, self.fed.device)
        return loss, acc

    def __call__(self, record: RoundRecord, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        """``record``: the finished round; ``state``: the new global model. Returns (test loss, accuracy)."""
        loss, acc = self.test(state)
        self.leakage(record.server_round, record.observations)
        self.inversion(record.server_round, state)
        if self.on_round_end is not None:
            self.on_round_end(record.server_round, record.observations)
        self.participation.update(record.clients)
        self.account()
        train, ev = record.train_metrics, record.eval_metrics
        self.store.finish_round(record.server_round, {k: v.detach().cpu() for k, v in state.items()}, {
            "test_loss": loss, "test_acc": acc, "train_loss": train.get("train-loss", np.nan),
            "eval_loss": ev.get("eval-loss", np.nan), "eval_acc": ev.get("eval-acc", np.nan),
            "clients": " ".join(map(str, record.clients)), "failures": len(record.failures),
            "round_seconds": round(time.perf_counter() - self.started, 4),
            "record_seconds": round(self.store.record_seconds, 4)})
        self.store.record_seconds = 0.0
        self.started = time.perf_counter()
        if self.progress is not None:
            self.progress(record.server_round)
        return loss, acc


def run_federation(grid: Grid, scenario: Scenario, store: RunStore, on_round_end: RoundHook | None = None,
                   progress: Callable[[int], None] | None = None, fed: Federation | None = None) -> None:
    """Rounds ``store.last_round + 1 .. rounds``: train, observe, aggregate, evaluate, persist. ``fed``: the
    scenario's federation when this process has built it already."""
    fed = fed or prepare(scenario)
    start = store.last_round
    remaining = scenario.federation.rounds - start
    if remaining <= 0:
        return
    # what later stages read instead of rebuilding a federation; where the server evaluates and attacks
    store.update_state(classes=fed.classes, server_device=device_name(fed.device))
    initial = store.checkpoint() or {k: v.detach().cpu() for k, v in fed.model().state_dict().items()}
    node_clients = discover_clients(grid, scenario.federation.num_clients)
    end = RoundEnd(scenario, fed, store, on_round_end, progress)
    record_all = scenario.threat_model.record == "all"
    plan = LocalTraining.from_scenario(scenario.training)
    observed = ObservedModel.of(fed.model(), plan, fed.norm, fed.data.num_classes, fed.data.shape)

    def keep(server_round: int, client: int) -> bool:
        return record_all or scenario.attacked(server_round, client)

    if (secagg := secure_aggregation(scenario.defenses)) is not None:
        from fl_sim.federation.secagg import run_secagg_rounds

        run_secagg_rounds(grid, scenario, secagg, observed, node_clients, initial, start, end.observed, end,
                          fed.union, fed.max_examples())
        return

    strategy = CuriousStrategy(honest_fedavg(scenario.federation.clients_per_round,
                                             evaluate=scenario.federation.client_evaluation
                                             and scenario.data.holdout_fraction > 0),
                               model=observed, node_clients=node_clients,
                               clients_per_round=scenario.federation.clients_per_round, seed=scenario.seed,
                               observe=keep, on_round=end.observed, round_offset=start)

    def central_evaluation(local_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Called by Strategy.start after each round's federated evaluation: the round is complete."""
        server_round = local_round + start
        state = arrays.to_torch_state_dict()
        if local_round == 0:
            loss, acc = end.test(state)
        else:
            loss, acc = end(strategy.rounds.pop(server_round, RoundRecord(server_round, {})), state)
        return MetricRecord({"test-loss": loss, "test-acc": acc})

    strategy.start(grid, ArrayRecord({k: torch.as_tensor(v) for k, v in initial.items()}), num_rounds=remaining,
                   train_config=plan.to_record(), evaluate_config=ConfigRecord(), evaluate_fn=central_evaluation)


def build_server_app(scenario: Scenario | None = None, store: RunStore | None = None,
                     progress: Callable[[int], None] | None = None, fed: Federation | None = None) -> ServerApp:
    """A ServerApp bound to a scenario and run folder (and its federation, if built); unbound, it reads
    ``run_config`` (for `flwr run`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        if store is not None and scenario is not None:  # an engine of this process (fl-sim run): it ends the run
            run_federation(grid, scenario, store, progress=progress, fed=fed)
            return
        run_scenario = scenario_from_context(context)  # `flwr run` / fl-sim deploy: its own run folder and log
        out = context.run_config.get("out")
        run_store = RunStore.create(run_scenario, Path(str(out)) if out else None)
        with run_log(run_store.root):
            try:
                run_federation(grid, run_scenario, run_store, progress=progress)
            except BaseException:
                run_store.end("failed")
                log.exception("run failed")
                raise
            else:
                run_store.end("finished" if run_store.last_round >= run_scenario.federation.rounds else "incomplete")
            finally:
                report_after_run(run_store.root)

    return app


app = build_server_app()


def run_engine(scenario: Scenario, store: RunStore, progress: Callable[[int], None] | None = None,
               fed: Federation | None = None) -> None:
    """The scenario's federation on its engine (fl_sim.engines): one ServerApp bound to ``store`` and a ClientApp
    per client — sharing ``fed`` when the engine runs them in this process."""
    engine = ENGINES.get(scenario.engine)
    fed = fed or prepare(scenario)
    client_app = build_client_app(scenario, fed if engine.shares_process else None)
    engine.run(build_server_app(scenario, store, progress, fed), client_app, scenario.federation.num_clients,
               scenario.seed, scenario.simulation)
