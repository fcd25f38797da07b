"""Gradient distances with per-layer weights; the target's norms are computed once."""

from __future__ import annotations

import torch


def layer_weights(n: int, scheme: str) -> list[float]:
    """uniform: 1 each; linear / exp: decreasing from the first layer to the last (as inversefed)."""
    if scheme == "linear":
        return [(n - i) / n for i in range(n)]
    if scheme == "exp":
        return [float(torch.exp(torch.tensor(-i / n * 10.0))) for i in range(n)]
    return [1.0] * n


def gradient_distance(trial: list[torch.Tensor], target: list[torch.Tensor], weights: list[float], loss: str,
                      target_norm: torch.Tensor) -> torch.Tensor:
    """The distance between a trial gradient and the target (lists of per-layer tensors), a scalar.
    Uniform weights skip the multiplications (two fewer ops per layer, forward and backward)."""
    uniform = all(w == 1.0 for w in weights)
    pairs = zip(weights, trial, target, strict=True)
    if loss == "l2":
        return sum((g - t).pow(2).sum() if uniform else w * (g - t).pow(2).sum() for w, g, t in pairs)
    dot, trial_sq = 0.0, 0.0
    for w, g, t in pairs:
        dot = dot + ((g * t).sum() if uniform else w * (g * t).sum())
        trial_sq = trial_sq + (g.pow(2).sum() if uniform else w * g.pow(2).sum())
    return 1 - dot / (torch.sqrt(trial_sq) * target_norm).clamp_min(1e-30)


def weighted_norm(target: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return torch.sqrt(sum(w * t.pow(2).sum() for w, t in zip(weights, target, strict=True)))


class GradientDistance:
    """``l2``: Σ_l w_l ‖g'_l − g_l‖²; ``cosine``: 1 − Σ w_l⟨g'_l, g_l⟩ / (√Σ w_l‖g'_l‖² · √Σ w_l‖g_l‖²)."""

    def __init__(self, target: list[torch.Tensor], loss: str, weights: str) -> None:
        self.target, self.loss = [t.detach() for t in target], loss
        self.weights = layer_weights(len(target), weights)
        self.target_norm = weighted_norm(self.target, self.weights)

    def __call__(self, trial: list[torch.Tensor]) -> torch.Tensor:
        return gradient_distance(trial, self.target, self.weights, self.loss, self.target_norm)
