"""CuriousStrategy: aggregates honestly (delegating to any Flower strategy) and records what it sees.

Built like Flower's DP wrappers (``DifferentialPrivacyServerSideFixedClipping(strategy, ...)``): a thin
Strategy around another one, preconditions checked in ``__init__``. Per round it

* samples ``clients_per_round`` clients deterministically by client id (seed, round), and lets the
  inner strategy configure exactly those nodes;
* per reply, strips the simulation's evaluation-only record and the shared features, then builds an
  Observation (:func:`fl_sim.federation.protocol.observation`) from what remains for the observed clients;
* delegates aggregation to the inner strategy; for FedSGD it then takes the server step
  θ ← θ − lr · mean gradient (:func:`fl_sim.federation.protocol.fedsgd_step`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fl_sim.federation.protocol import (
    EVALUATION_RECORD,
    FEATURES_RECORD,
    ObservedModel,
    RoundRecord,
    batches_from_record,
    failure_lines,
    fedsgd_step,
    observation,
    sample_clients,
)

log = logging.getLogger("fl_sim")


class SampledGrid(Grid):
    """A view of a Grid that exposes only the nodes sampled for this round."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._nodes = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def set_run(self, run):  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def train_metrics_aggregation(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Weighted mean of the training loss only: protocol metadata (ids, sizes) is not averaged."""
    weights = [float(next(iter(r.metric_records.values()))[weighted_by_key]) for r in records]
    losses = [float(next(iter(r.metric_records.values()))["train-loss"]) for r in records]
    return MetricRecord({"train-loss": float(np.average(losses, weights=weights))})


def honest_fedavg(clients_per_round: int, evaluate: bool) -> FedAvg:
    """Flower's FedAvg as the curious strategy's inner aggregation: it trains (and, with ``evaluate``,
    evaluates) every node it is offered — the round's sampled clients."""
    return FedAvg(fraction_train=1.0, fraction_evaluate=1.0 if evaluate else 0.0,
                  min_train_nodes=clients_per_round, min_evaluate_nodes=clients_per_round,
                  min_available_nodes=clients_per_round, train_metrics_aggr_fn=train_metrics_aggregation)


class CuriousStrategy(Strategy):
    """Honest-but-curious wrapper: ``strategy`` aggregates; this records one Observation per observed client."""

    def __init__(self, strategy: Strategy, *, model: ObservedModel, node_clients: dict[int, int],
                 clients_per_round: int, seed: int, observe: Callable[[int, int], bool],
                 on_round: Callable[[RoundRecord], None], round_offset: int = 0) -> None:
        if model.plan.protocol == "fedsgd" and not (
                isinstance(strategy, FedAvg) and type(strategy).aggregate_train is FedAvg.aggregate_train):
            raise ValueError(f"FedSGD's server step θ ← θ − lr · mean gradient needs an inner strategy whose "
                             f"aggregate is FedAvg's weighted mean; {type(strategy).__name__} aggregates otherwise")
        if isinstance(strategy, FedAvg) and strategy.fraction_train != 1.0:
            raise ValueError(f"the inner strategy must train every client the curious strategy samples "
                             f"(fraction_train = 1.0, not {strategy.fraction_train})")
        if not 1 <= clients_per_round <= len(node_clients):
            raise ValueError(f"clients_per_round = {clients_per_round}, but {len(node_clients)} clients are connected")
        self.strategy, self.model, self.node_clients = strategy, model, node_clients
        self.clients_per_round, self.seed, self.round_offset = clients_per_round, seed, round_offset
        self.observe, self.on_round = observe, on_round
        self._sent: dict[int, ArrayRecord] = {}
        self._sampled: dict[int, list[int]] = {}
        self.rounds: dict[int, RoundRecord] = {}  # filled by aggregate_*, popped by the round's owner

    # --- sampling ---------------------------------------------------------------------------
    def sample_clients(self, server_round: int) -> list[int]:
        return sample_clients(self.seed, sorted(self.node_clients.values()), self.clients_per_round, server_round)

    def _nodes_for(self, clients: list[int]) -> list[int]:
        by_client = {c: n for n, c in self.node_clients.items()}
        return [by_client[c] for c in clients]

    # --- Strategy API ---------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                        ) -> Iterable[Message]:
        real = server_round + self.round_offset
        clients = self.sample_clients(real)
        self._sent[real], self._sampled[real] = arrays, clients
        return self.strategy.configure_train(real, arrays, config, SampledGrid(grid, self._nodes_for(clients)))

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        real = server_round + self.round_offset
        sent = self._sent.pop(real)
        record = RoundRecord(real, sent.to_torch_state_dict(), clients=self._sampled.pop(real))
        kept: list[tuple[int, Message]] = []  # (client, reply), aggregated in client order: the transport's
        errors: list[tuple[int | None, str]] = []  # reply order must not change the float sums
        replied: set[int] = set()
        for msg in replies:
            if msg.has_error():  # a SuperLink-made error (node unavailable) comes from node 0
                errors.append((self.node_clients.get(msg.metadata.src_node_id), msg.error.reason))
                kept.append((-1, msg))
                continue
            evaluation = msg.content.pop(EVALUATION_RECORD, None)  # the simulation's channel: never observed
            features = msg.content.pop(FEATURES_RECORD, None)  # shared features: observed, not aggregated
            [arrays] = msg.content.array_records.values()
            [metrics] = msg.content.metric_records.values()
            obs = observation(real, record.global_state, dict(arrays.to_torch_state_dict()), metrics, self.model,
                              features)
            replied.add(obs.client)
            if self.observe(real, obs.client):
                record.observations.append(obs)
                if evaluation is not None:
                    record.batches[obs.client] = batches_from_record(evaluation)
            kept.append((obs.client, msg))
        record.failures = failure_lines(record.clients, replied, errors)
        arrays, metrics = self.strategy.aggregate_train(real, [m for _, m in sorted(kept, key=lambda cm: cm[0])])
        if arrays is not None and self.model.plan.protocol == "fedsgd":
            arrays = ArrayRecord(fedsgd_step(record.global_state, arrays.to_torch_state_dict(), self.model.plan.lr,
                                             self.model.param_names))
        record.train_metrics = dict(metrics or {})
        record.observations.sort(key=lambda o: o.client)  # reply order depends on the transport
        self.rounds[real] = record
        self.on_round(record)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        real = server_round + self.round_offset
        nodes = self._nodes_for(self.sample_clients(real))
        return self.strategy.configure_evaluate(real, arrays, config, SampledGrid(grid, nodes))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        real = server_round + self.round_offset
        ordered = sorted(replies, key=lambda m: self.node_clients.get(m.metadata.src_node_id, -1))
        metrics = self.strategy.aggregate_evaluate(real, ordered)
        if real in self.rounds:
            self.rounds[real].eval_metrics = dict(metrics or {})
        return metrics

    def summary(self) -> None:
        log.info("CuriousStrategy: %d of %d clients per round (sampled by client id), observing %s replies",
                 self.clients_per_round, len(self.node_clients), self.model.plan.protocol)
        self.strategy.summary()
