"""CuriousStrategy: aggregates honestly (delegating to Flower's FedAvg) and records what it sees.

Built like Flower's DP wrappers: a thin Strategy around another one. Per round it

* samples ``clients_per_round`` clients deterministically by client id (seed, round), and lets the
  inner strategy configure exactly those nodes;
* per reply, strips the simulation's Secret record, then builds an Observation from what remains
  (global state sent, ArrayRecord, MetricRecord) for the attacked clients;
* delegates aggregation to the inner strategy; for FedSGD it then takes the server step
  θ ← θ − lr · mean gradient (buffers are averaged).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fl_sim.data.images import Normalization
from fl_sim.features import FEATURES_RECORD, SharedFeatures
from fl_sim.observation import Observation, ProtocolMeta
from fl_sim.secret import SECRET_RECORD, Secret

log = logging.getLogger("fl_sim")
METADATA_KEYS = ("client-id", "batch-size", "local-steps", "lr")


@dataclass
class RoundRecord:
    """What one round produced, handed to the run's sinks."""

    server_round: int
    global_state: dict[str, torch.Tensor]
    observations: list[Observation] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


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


@dataclass(frozen=True)
class ObservedModel:
    """What the server knows of its own model and protocol (needed to build Observations)."""

    protocol: str
    lr: float  # the learning rate of the FedSGD server step
    param_names: frozenset[str]
    normalization: Normalization
    num_classes: int
    image_shape: tuple[int, int, int]
    optimizer: str
    momentum: float
    weight_decay: float
    batchnorm: str
    feature_dim: int = 0  # inputs of the last linear layer (what shared features index into)


def sample_clients(seed: int, clients: list[int], k: int, server_round: int) -> list[int]:
    """The round's ``k`` clients, deterministic in (seed, round): the same on every engine and workflow."""
    rng = np.random.default_rng([seed, 4, server_round])
    return sorted(int(c) for c in rng.choice(clients, size=k, replace=False))


def failure_lines(sampled: list[int], replied: set[int], errors: list[tuple[int | None, str]]) -> list[str]:
    """'client C: reason' per failed reply; errors without a known client go to the sampled clients that
    neither replied nor failed by name, in order."""
    unnamed = [c for c in sampled if c not in replied and c not in {e[0] for e in errors}]
    return [f"client {c if c is not None else (unnamed.pop(0) if unnamed else '?')}: {reason}"
            for c, reason in errors]


class CuriousStrategy(Strategy):
    """Honest-but-curious wrapper around an aggregation strategy (FedAvg by default)."""

    def __init__(self, *, model: ObservedModel, node_clients: dict[int, int], clients_per_round: int, seed: int,
                 observe: Callable[[int, int], bool], on_round: Callable[[RoundRecord], None],
                 inner: FedAvg | None = None, round_offset: int = 0, evaluate_holdout: bool = True) -> None:
        self.model, self.node_clients = model, node_clients
        self.clients_per_round, self.seed, self.round_offset = clients_per_round, seed, round_offset
        self.observe, self.on_round = observe, on_round
        fraction = clients_per_round / len(node_clients) if evaluate_holdout else 0.0
        self.inner = inner or FedAvg(
            fraction_train=1.0, fraction_evaluate=1.0 if fraction else 0.0,
            min_train_nodes=clients_per_round, min_evaluate_nodes=clients_per_round,
            min_available_nodes=clients_per_round, train_metrics_aggr_fn=train_metrics_aggregation)
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
        return self.inner.configure_train(real, arrays, config, SampledGrid(grid, self._nodes_for(clients)))

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
            secret_record = msg.content.pop(SECRET_RECORD, None)  # evaluation-only channel: never observed
            features = msg.content.pop(FEATURES_RECORD, None)  # shared features: observed, not aggregated
            obs = self._observation(real, record.global_state, msg.content, features)
            replied.add(obs.client)
            if self.observe(real, obs.client):
                record.observations.append(obs)
                if secret_record is not None:
                    record.secrets.append(Secret.from_record(real, obs.client, secret_record))
            kept.append((obs.client, msg))
        record.failures = failure_lines(record.clients, replied, errors)
        arrays, metrics = self.inner.aggregate_train(real, [m for _, m in sorted(kept, key=lambda cm: cm[0])])
        if arrays is not None and self.model.protocol == "fedsgd":
            arrays = self._fedsgd_step(sent, arrays)
        record.train_metrics = dict(metrics or {})
        record.observations.sort(key=lambda o: o.client)  # reply order depends on the transport
        self.rounds[real] = record
        self.on_round(record)
        return arrays, metrics

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
                           ) -> Iterable[Message]:
        real = server_round + self.round_offset
        nodes = self._nodes_for(self.sample_clients(real))
        return self.inner.configure_evaluate(real, arrays, config, SampledGrid(grid, nodes))

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        real = server_round + self.round_offset
        ordered = sorted(replies, key=lambda m: self.node_clients.get(m.metadata.src_node_id, -1))
        metrics = self.inner.aggregate_evaluate(real, ordered)
        if real in self.rounds:
            self.rounds[real].eval_metrics = dict(metrics or {})
        return metrics

    def summary(self) -> None:
        log.info("CuriousStrategy over %s: %d clients per round, observing %s",
                 type(self.inner).__name__, self.clients_per_round, self.model.protocol)

    # --- helpers ----------------------------------------------------------------------------
    def _observation(self, server_round: int, global_state: dict[str, torch.Tensor], content: RecordDict,
                     features: ArrayRecord | None = None) -> Observation:
        [arrays] = content.array_records.values()
        [metrics] = content.metric_records.values()
        m = self.model
        meta = ProtocolMeta(protocol=m.protocol, num_examples=int(metrics["num-examples"]),
                            batch_size=int(metrics["batch-size"]), local_steps=int(metrics["local-steps"]),
                            lr=float(metrics["lr"]), optimizer=m.optimizer, momentum=m.momentum,
                            weight_decay=m.weight_decay, batchnorm=m.batchnorm,
                            train_loss=float(metrics["train-loss"]))
        return Observation(server_round=server_round, client=int(metrics["client-id"]),
                           kind="gradient" if m.protocol == "fedsgd" else "weights",
                           global_state=global_state, update=dict(arrays.to_torch_state_dict()), meta=meta,
                           normalization=m.normalization, num_classes=m.num_classes, image_shape=m.image_shape,
                           features=None if features is None else SharedFeatures(
                               *(torch.from_numpy(features[k].numpy().copy()) for k in ("values", "indices")),
                               m.feature_dim))

    def _fedsgd_step(self, sent: ArrayRecord, mean: ArrayRecord) -> ArrayRecord:
        """θ ← θ − lr · (weighted mean gradient) for parameters; buffers take the weighted mean."""
        lr = self.model.lr
        current, avg = sent.to_torch_state_dict(), mean.to_torch_state_dict()
        new = {}
        for name, value in current.items():
            if name in self.model.param_names:
                new[name] = value - lr * avg[name].to(value.dtype)
            else:
                mean_value = avg[name] if value.is_floating_point() else avg[name].round()  # e.g. BN batch counts
                new[name] = mean_value.to(value.dtype)
        return ArrayRecord(new)
