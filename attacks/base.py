"""What an attack returns, and the interface every attack implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from fl_sim.observation import Observation


@dataclass
class Reconstruction:
    """An attack's output for one Observation.

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


class Attack(Protocol):
    """``reconstruct(observation, model)``: the model is the server's own architecture (any weights)."""

    name: str

    def reconstruct(self, observation: Observation, model: nn.Module,
                    oracle_labels: torch.Tensor | None = None) -> Reconstruction: ...
