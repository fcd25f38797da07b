"""Normalization: the per-channel mean/std between [0, 1] images and the model's input (part of every Observation)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std the model input is normalized with: x_model = (x - mean) / std."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @staticmethod
    def identity(channels: int) -> Normalization:
        return Normalization((0.0,) * channels, (1.0,) * channels)

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, len(self.mean), 1, 1)
        return (torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(shape),
                torch.tensor(self.std, dtype=like.dtype, device=like.device).view(shape))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] → model input."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (B, C, H, W) → [0, 1] image space (not clipped)."""
        mean, std = self._stats(x)
        return x * std + mean
