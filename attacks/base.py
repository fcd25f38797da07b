"""What attacks return, and the two kinds of attack (declared by the base class they implement).

* :class:`ObservationAttack` — ``reconstruct(observation, model)``: a client's private batch from what
  the server saw of that client (gradient matching, feature inversion);
* :class:`ModelAttack` — ``invert(global model, ...)``: training-like data from the global model the
  server holds (TLDR); no client update is needed.

The registry entry of every attack names its kind, so code asks the registry what an attack targets.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import StrEnum
from typing import ClassVar

import torch
from torch import nn

from fl_sim.observation import Normalization, Observation
from fl_sim.observation.capabilities import Capability


@dataclass(frozen=True)
class Setting:
    """What of the scenario decides which capabilities an attack reads and whether it can run."""

    protocol: str  # "fedsgd" | "fedavg"
    shares_features: bool  # clients send their batch's pruned penultimate features
    optimizer: str = "sgd"  # the clients' local optimizer
    batchnorm: str = "train"  # BatchNorm mode in local training
    local_steps: int = 1
    local_epochs: int = 0  # FedAvg: passes over the shard (0: local_steps batches)
    device: str = "auto"  # the scenario's device: auto | cpu | cuda


class Target(StrEnum):
    OBSERVATION = "observation"
    GLOBAL_MODEL = "global-model"


@dataclass
class Reconstruction:
    """An observation attack's output for one Observation.

    ``images``: (N, C, H, W) in [0, 1]; ``labels``: (N,) recovered labels or None; ``failure``:
    why the attack failed (e.g. the loss became NaN), or None.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    label_strategy: str
    loss_trace: list[float] = field(default_factory=list)
    iterations: int = 0
    seconds: float = 0.0
    failure: str | None = None


@dataclass
class Inversion:
    """A model attack's output: ``images`` (M, C, H, W) in [0, 1] generated for ``labels`` (M,);
    ``confidence`` (M,) the classifier's softmax probability of that label, ``predicted`` (M,) its argmax."""

    images: torch.Tensor
    labels: torch.Tensor
    confidence: torch.Tensor
    predicted: torch.Tensor
    loss_trace: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    failure: str | None = None


class ObservationAttack(ABC):
    """``reconstruct(observation, model)``: the model is the server's own architecture (any weights)."""

    target: ClassVar[Target] = Target.OBSERVATION
    batches_clients: ClassVar[bool] = False  # reconstruct_many solves a round's clients as one batch
    name: str

    @abstractmethod
    def reconstruct(self, observation: Observation, model: nn.Module,
                    oracle_labels: torch.Tensor | None = None) -> Reconstruction: ...

    def reconstruct_many(self, observations: list[Observation], model: nn.Module) -> list[Reconstruction]:
        """Every observation of one round (one by one unless the attack batches clients)."""
        return [self.reconstruct(obs, model) for obs in observations]

    @abstractmethod
    def capabilities(self, setting: Setting) -> frozenset[Capability]:
        """What of the server's knowledge this attack reads (fl_sim.observation.capabilities)."""

    @property
    def needs_oracle_labels(self) -> bool:
        """Whether it is an ablation that is handed the true labels (its rows are flagged)."""
        return False

    def incompatibility(self, model: nn.Module, setting: Setting) -> str | None:
        """What in the scenario this attack cannot work with (``model``: the architecture), or None."""
        return None


class ModelAttack(ABC):
    """``invert(model, normalization, num_classes, shape)``: reads only the global model the server holds."""

    target: ClassVar[Target] = Target.GLOBAL_MODEL
    name: str

    @abstractmethod
    def invert(self, model: nn.Module, norm: Normalization, num_classes: int,
               shape: tuple[int, int, int]) -> Inversion: ...

    def capabilities(self, setting: Setting) -> frozenset[Capability]:
        """The global model only."""
        return frozenset({Capability.GLOBAL_MODEL})


Attack = ObservationAttack | ModelAttack
