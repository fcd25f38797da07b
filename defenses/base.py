"""What a client-side defense sees and returns.

A defense transforms the client's *update* before it is sent: the parameter gradient (FedSGD) or the
parameter change θ_local − θ_global (FedAvg; the client then sends θ_global + the defended change).
Buffers (BatchNorm running statistics) pass through unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

Update = dict[str, torch.Tensor]  # parameter name → gradient or weight change, same shapes as the parameters


@dataclass(frozen=True)
class DefenseContext:
    """The client's own view when it defends one round's update."""

    global_model: Callable[[], nn.Module]  # a fresh copy of the model the client received (eval mode)
    inputs: torch.Tensor  # (B, C, H, W) normalised model input of the client's first local batch
    labels: torch.Tensor  # (B,)
    generator: torch.Generator  # seeded by (scenario seed, round, client): reruns add the same noise
    protocol: str  # "fedsgd" | "fedavg"


@dataclass(frozen=True)
class Participation:
    """How often a client's data is released, for privacy accounting."""

    rounds: int
    sample_rate: float  # clients_per_round / num_clients
    batch_rate: float  # batch_size / examples in a client's shard
    steps_per_round: int  # local steps (FedSGD: 1)


class Defense(Protocol):
    """``stage = "update"`` (default): ``apply`` transforms the update; ``"message"``: ``mod()`` is a Flower
    client mod wrapped around the train function."""

    params: BaseModel

    def apply(self, update: Update, ctx: DefenseContext) -> Update: ...


class Params(BaseModel):
    """Base of every defense's parameters: strict, unknown keys rejected, values named in errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def label(name: str, params: BaseModel, given: Iterable[str] = ()) -> str:
    """``dp(clip=1, sigma=0.01)``: the defense with the parameters the scenario set (all if it set none)."""
    values = params.model_dump()
    shown = {k: values[k] for k in given if k in values} or values
    return f"{name}({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in shown.items())})"


def rdp_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε at ``delta`` of ``steps`` subsampled Gaussian releases (noise multiplier ``sigma``), Opacus's RDP
    accountant; ∞ without noise."""
    from opacus.accountants import RDPAccountant

    if sigma == 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(sigma, min(1.0, sample_rate), steps)]
    with warnings.catch_warnings():  # tiny σ: Opacus notes its smallest order is optimal; ε is still valid
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
        return float(accountant.get_epsilon(delta))
