"""The threat surface: what the honest-but-curious server legitimately sees of one client in one round.

An Observation (the global state sent, the client's reply, the protocol metadata it reports), the
normalization between [0, 1] images and the model input, and the features a client may share. Attacks
receive only these (and the model architecture the server itself built); nothing here can reach a
client's private batch — that is :mod:`fl_sim.leakage.secret`, which an import contract keeps away
from attacks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from fl_sim.observation.features import SharedFeatures
from fl_sim.observation.normalization import Normalization

UpdateKind = Literal["gradient", "weights"]


@dataclass(frozen=True)
class ProtocolMeta:
    """The protocol metadata a client reports with its update (all of it visible to the server)."""

    protocol: str  # "fedsgd" | "fedavg"
    num_examples: int  # weight the client claims for aggregation
    batch_size: int  # size of its (first) local batch
    local_steps: int  # optimizer steps taken
    lr: float
    optimizer: str
    momentum: float  # local optimizer settings the server instructed
    weight_decay: float
    batchnorm: str  # "train" | "eval" during local training
    train_loss: float
    local_epochs: int = 0  # FedAvg: shuffled passes over the shard the server instructed (0: local_steps batches)


@dataclass(frozen=True)
class Observation:
    """One client's reply in one round, with the global state the server sent it.

    ``global_state`` / ``update``: name → tensor (the model's state-dict names). For ``kind =
    "gradient"`` (FedSGD) the update holds ∂loss/∂θ for parameters and the client's buffers after
    its forward pass; for ``"weights"`` (FedAvg) the client's full state after local training.
    """

    server_round: int
    client: int
    kind: UpdateKind
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    meta: ProtocolMeta
    normalization: Normalization
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) the model takes
    extras: dict[str, str] = field(default_factory=dict)
    features: SharedFeatures | None = None  # pruned penultimate features, when the scenario shares them


__all__ = ["Normalization", "Observation", "ProtocolMeta", "SharedFeatures", "UpdateKind"]
