"""The FL protocol between clients and the curious server, in one place.

What a client's reply carries (an ArrayRecord with its update, a MetricRecord with what it reports,
shared features when the scenario has clients share them, and the simulation's evaluation-only
record of the batches it used), how the server samples clients, the FedSGD server step, and the one
builder of Observations — used by the curious strategy, the SecAgg+ path and single-client runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord
from torch import nn

from fl_sim.base.streams import CLIENT_SAMPLING
from fl_sim.observation import Normalization, Observation, ProtocolMeta, SharedFeatures
from fl_sim.observation.features import last_linear
from fl_sim.training import LocalTraining

EVALUATION_RECORD = "fl-sim.secret"  # the reply's evaluation-only ConfigRecord: stripped before observing
FEATURES_RECORD = "features"  # the reply's ArrayRecord of shared features: "values" and "indices"
Batches = tuple[np.ndarray, ...]  # dataset indices, one array per local step, in the order they were used


# --- what a client sends --------------------------------------------------------------------------------
def client_metrics(client: int, batches: Sequence[np.ndarray], loss: float, plan: LocalTraining,
                   shard_size: int, poisson: bool = False) -> dict[str, Any]:
    """The MetricRecord a client reports: the weight it claims (FedSGD: examples used; FedAvg: its shard)
    and the protocol metadata of its local training. Poisson-sampled batches (DP-SGD) are reported at their
    expected size: their realised sizes are part of what DP-SGD keeps private."""
    sizes = [plan.batch_size] * len(batches) if poisson else [len(b) for b in batches]
    return {"num-examples": sum(sizes) if plan.protocol == "fedsgd" else shard_size, "train-loss": loss,
            "client-id": client, "batch-size": sizes[0], "local-steps": len(batches), "lr": plan.lr}


def evaluation_record(batches: Batches) -> ConfigRecord:
    """The simulation's evaluation-only channel: the dataset indices the client used, per step."""
    return ConfigRecord({"indices": [int(i) for b in batches for i in b], "step-sizes": [len(b) for b in batches]})


def batches_from_record(record: ConfigRecord) -> Batches:
    flat = np.asarray(record["indices"], dtype=np.int64)
    return tuple(np.split(flat, np.cumsum(record["step-sizes"])[:-1]))


def features_record(shared: SharedFeatures) -> ArrayRecord:
    return ArrayRecord({"values": shared.values, "indices": shared.indices})


# --- what the server knows and observes -------------------------------------------------------------------
@dataclass(frozen=True)
class ObservedModel:
    """What the server knows of its own model and of the training it instructed (needed to build Observations)."""

    plan: LocalTraining
    param_names: frozenset[str]
    normalization: Normalization
    num_classes: int
    image_shape: tuple[int, int, int]
    feature_dim: int = 0  # inputs of the last linear layer (what shared features index into)

    @staticmethod
    def of(model: nn.Module, plan: LocalTraining, normalization: Normalization, num_classes: int,
           image_shape: tuple[int, int, int]) -> ObservedModel:
        return ObservedModel(plan, frozenset(n for n, _ in model.named_parameters()), normalization, num_classes,
                             image_shape, last_linear(model)[1].in_features)


def observation(server_round: int, global_state: dict[str, torch.Tensor], update: dict[str, torch.Tensor],
                reported: Mapping[str, Any], model: ObservedModel, features: ArrayRecord | None = None
                ) -> Observation:
    """An Observation from what reached the server: the state it sent, the update and the reported metrics."""
    p = model.plan
    meta = ProtocolMeta(protocol=p.protocol, num_examples=int(reported["num-examples"]),
                        batch_size=int(reported["batch-size"]), local_steps=int(reported["local-steps"]),
                        lr=float(reported["lr"]), optimizer=p.optimizer, momentum=p.momentum,
                        weight_decay=p.weight_decay, batchnorm=p.batchnorm, train_loss=float(reported["train-loss"]),
                        local_epochs=p.local_epochs if p.protocol == "fedavg" else 0)
    shared = None if features is None else SharedFeatures(
        *(torch.from_numpy(features[k].numpy().copy()) for k in ("values", "indices")), model.feature_dim)
    return Observation(server_round=server_round, client=int(reported["client-id"]),
                       kind="gradient" if p.protocol == "fedsgd" else "weights", global_state=global_state,
                       update=update, meta=meta, normalization=model.normalization, num_classes=model.num_classes,
                       image_shape=model.image_shape, features=shared)


@dataclass
class RoundRecord:
    """What one round produced, handed to the run's sinks."""

    server_round: int
    global_state: dict[str, torch.Tensor]
    observations: list[Observation] = field(default_factory=list)
    batches: dict[int, Batches] = field(default_factory=dict)  # observed client → its evaluation-only record
    failures: list[str] = field(default_factory=list)
    clients: list[int] = field(default_factory=list)
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)


# --- the server's side of a round ----------------------------------------------------------------------
def sample_clients(seed: int, clients: list[int], k: int, server_round: int) -> list[int]:
    """The round's ``k`` clients, deterministic in (seed, round): the same on every engine and workflow."""
    rng = CLIENT_SAMPLING.rng(seed, server_round)
    return sorted(int(c) for c in rng.choice(clients, size=k, replace=False))


def fedsgd_step(sent: dict[str, torch.Tensor], mean: dict[str, torch.Tensor], lr: float,
                param_names: frozenset[str]) -> dict[str, torch.Tensor]:
    """θ ← θ − lr · (weighted mean gradient) for parameters; buffers take the weighted mean (integer buffers,
    e.g. BatchNorm batch counts, rounded)."""
    new = {}
    for name, value in sent.items():
        if name in param_names:
            new[name] = value - lr * mean[name].to(value.dtype)
        else:
            mean_value = mean[name] if value.is_floating_point() else mean[name].double().round()
            new[name] = mean_value.to(value.dtype)
    return new


def failure_lines(sampled: list[int], replied: set[int], errors: list[tuple[int | None, str]]) -> list[str]:
    """'client C: reason' per failed reply; errors without a known client go to the sampled clients that
    neither replied nor failed by name, in order."""
    unnamed = [c for c in sampled if c not in replied and c not in {e[0] for e in errors}]
    return [f"client {c if c is not None else (unnamed.pop(0) if unnamed else '?')}: {reason}"
            for c, reason in errors]
