"""What a defense is: its stage in the client's round (declared by the base class it implements), what it
sees and what it returns.

Stages, in the order a client's round meets them:

* ``training`` — replaces the client's local optimisation (DP-SGD); may fix the global model first;
* ``update`` — transforms the update the client is about to send: the parameter gradient (FedSGD) or the
  parameter change θ_local − θ_global (FedAvg; the client then sends θ_global + the defended change).
  Buffers (BatchNorm running statistics) pass through unchanged;
* ``features`` — transforms the penultimate features a feature-sharing client sends;
* ``message`` — a Flower client mod around the ClientApp's train function (LocalDpMod);
* ``protocol`` — changes what the server receives at all (secure aggregation): a client mod and a server
  workflow.

A defense that defines a privacy budget also implements :class:`Accountant`.
"""

from __future__ import annotations

import functools
import math
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from fl_sim.observation import Normalization, SharedFeatures

Update = dict[str, torch.Tensor]  # parameter name → gradient or weight change, same shapes as the parameters


@dataclass(frozen=True)
class DefenseContext:
    """The client's own view when it defends one round's update."""

    global_model: Callable[[], nn.Module]  # a fresh copy of the model the client received (eval mode)
    inputs: torch.Tensor  # (B, C, H, W) normalised model input of the client's first local batch
    labels: torch.Tensor  # (B,)
    generator: torch.Generator  # seeded by (scenario seed, round, client): reruns add the same noise
    protocol: str  # "fedsgd" | "fedavg"


ADVERSARY = "curious server (it samples the clients and sees each one's update alone: no amplification by sampling)"


@dataclass(frozen=True)
class Releases:
    """What one client released to the server, for privacy accounting."""

    participations: int  # rounds it was sampled in (an upper bound on the updates the server received)
    steps_per_round: int  # local optimisation steps per round (FedSGD: 1)
    batch_rate: float  # expected batch / examples in its shard (DP-SGD's Poisson sampling rate)


@dataclass(frozen=True)
class Budget:
    """A privacy guarantee against :data:`ADVERSARY`: (ε, δ) at a level, for an adjacency, by an accountant."""

    epsilon: float
    delta: float
    level: str  # "client" (the client's whole dataset) | "example" (one example of it)
    adjacency: str
    accountant: str


class Stage(StrEnum):
    TRAINING = "training"
    UPDATE = "update"
    FEATURES = "features"
    MESSAGE = "message"
    PROTOCOL = "protocol"


class Defense(ABC):
    """A defense with its validated parameters; subclasses declare their stage through the base they extend."""

    stage: ClassVar[Stage]

    def __init__(self, params: Params) -> None:
        self.params = params


class TrainingDefense(Defense):
    """Replaces the client's local optimisation; ``prepare_model`` fixes the global model it needs (for
    everyone, the server and so the attacker included)."""

    stage = Stage.TRAINING
    poisson_batches: ClassVar[bool] = False  # it needs each example in a batch independently (Poisson sampling)

    @staticmethod
    def prepare_model(model: nn.Module) -> nn.Module:
        return model

    @abstractmethod
    def local_update(self, model: nn.Module, pool: Any, batches: Sequence[np.ndarray], plan: Any,
                     norm: Normalization, device: torch.device, seed: int) -> tuple[Update, float]:
        """As :func:`fl_sim.training.local_update`, defended; randomness from a generator seeded by ``seed``."""


class UpdateDefense(Defense):
    stage = Stage.UPDATE

    @abstractmethod
    def apply(self, update: Update, ctx: DefenseContext) -> Update: ...


class FeatureDefense(Defense):
    stage = Stage.FEATURES

    @abstractmethod
    def apply_features(self, shared: SharedFeatures, generator: torch.Generator) -> SharedFeatures: ...


class MessageDefense(Defense):
    stage = Stage.MESSAGE

    @abstractmethod
    def mod(self) -> Callable[..., Any]:
        """A Flower client mod wrapped around the ClientApp's train function."""


class ProtocolDefense(MessageDefense):
    stage = Stage.PROTOCOL

    @abstractmethod
    def workflow(self, max_examples: int) -> Any:
        """The Flower server workflow that runs the rounds; ``max_examples``: the most a client reports."""


class Accountant(ABC):
    """A defense that defines a privacy budget, per client, for what that client released."""

    @abstractmethod
    def budget(self, releases: Releases) -> Budget: ...

    @abstractmethod
    def reconstruction_bound(self, releases: Releases, kappa: float) -> float:
        """η of the (η, κ)-ReRo guarantee (:mod:`defenses.rero`) against the same adversary, at the level of
        :meth:`budget`: no attack recovers a target of this client with probability above η when a prior-only
        guess succeeds with probability ``kappa``."""


class Params(BaseModel):
    """Base of every defense's parameters: strict, unknown keys rejected, values named in errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def label(name: str, params: BaseModel, given: Iterable[str] | None = None, keep: Iterable[str] = ()) -> str:
    """``dp(sigma=0.01)``: the defense with the parameters the scenario set to other than their defaults and those
    in ``keep`` (a comparison's swept ones); ``given`` None: every parameter, defaults included."""
    values = params.model_dump()
    fields, keep = type(params).model_fields, set(keep)
    given = None if given is None else set(given)
    shown = values if given is None else {k: v for k, v in values.items()
                                          if k in keep or (k in given and v != fields[k].default)}
    if not shown:
        return name
    return f"{name}({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in shown.items())})"


History = tuple[tuple[float, float, int], ...]  # (noise multiplier σ, sample rate, steps), as Opacus keeps them


def rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` subsampled Gaussian releases (noise multiplier ``sigma``), Opacus's RDP
    accountant; ∞ without noise."""
    return epsilon("rdp", ((sigma, sample_rate, steps),), delta)


@functools.lru_cache(maxsize=512)
def epsilon(accountant: str, history: History, delta: float) -> float:
    """ε at ``delta`` of the subsampled Gaussian releases in ``history`` by Opacus's ``"rdp"`` or ``"prv"``
    accountant (PRV: its upper estimate); 0 without releases, ∞ for one without noise or a δ the PRV
    discretisation cannot resolve."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    history = tuple((s, min(1.0, q), t) for s, q, t in history if t > 0)
    if not history:
        return 0.0
    if any(s == 0 for s, _, _ in history):
        return math.inf
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # RDP: an order at the end of Opacus's range is optimal (ε still valid); PRV: log(0) masked at its edge
        warnings.filterwarnings("ignore", message="Optimal order is the (smallest|largest) alpha")
        try:
            return float(acc.get_epsilon(delta))
        except (RuntimeError, ValueError):  # PRV: δ below the discretisation's floating-point floor
            return math.inf
