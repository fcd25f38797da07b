"""Gradient distances with per-layer weights; the target's norms are computed once.

The cosine distance of the eager loop is one autograd node (``FusedCosine``): two dot products per layer
forward, one fused ``a·t + b·g`` per layer backward, instead of the five full-size elementwise passes and
their backward that the plain formula records on every ResNet-sized gradient (measured: 247 → 219 ms per
ResNet-18 objective evaluation on 2 cores). Gradients under a million elements (the LeNet: no gain measured)
and vmapped / compiled steps (attacks.batched, whose compiler fuses the formula itself) keep the plain formula,
so a small model's one-by-one and batched runs round alike.
"""

from __future__ import annotations

import torch

from fl_sim.base.cpu import blas_on_one_thread


def layer_weights(n: int, scheme: str) -> list[float]:
    """uniform: 1 each; linear / exp: decreasing from the first layer to the last (as inversefed)."""
    if scheme == "linear":
        return [(n - i) / n for i in range(n)]
    if scheme == "exp":
        return [float(torch.exp(torch.tensor(-i / n * 10.0))) for i in range(n)]
    return [1.0] * n


def gradient_distance(trial: list[torch.Tensor], target: list[torch.Tensor], weights: list[float], loss: str,
                      target_norm: torch.Tensor, batched: bool = False) -> torch.Tensor:
    """The distance between a trial gradient and the target (lists of per-layer tensors), a scalar — or, with
    ``batched``, K distances (K,) of tensors with a leading problem dimension (``target_norm`` (K,)).
    Uniform weights skip the multiplications (two fewer ops per layer, forward and backward)."""
    def total(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1) if batched else x.sum()

    uniform = all(w == 1.0 for w in weights)
    pairs = zip(weights, trial, target, strict=True)
    if loss == "l2":
        return sum(total((g - t).pow(2)) if uniform else w * total((g - t).pow(2)) for w, g, t in pairs)
    dot, trial_sq = 0.0, 0.0
    for w, g, t in pairs:
        dot = dot + (total(g * t) if uniform else w * total(g * t))
        trial_sq = trial_sq + (total(g.pow(2)) if uniform else w * total(g.pow(2)))
    return 1 - dot / (torch.sqrt(trial_sq) * target_norm).clamp_min(1e-30)


DOT_CHUNK = 1 << 17
FUSED_MIN_ELEMENTS = 1_000_000


def accurate_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """⟨a, b⟩ of two tensors of one shape: BLAS dots over chunks of DOT_CHUNK elements, then summed — as accurate as
    ``(a * b).sum()`` (one BLAS dot over millions of float32 terms is ~100x less so), at under half its time (2.4 M
    elements on 2 cores: 1.1 ms; 1.9 ms as batched dots of 256-element rows, 1.5 ms as ``(a * b).sum()``)."""
    a, b = a.reshape(-1), b.reshape(-1)
    if a.numel() <= DOT_CHUNK:
        return torch.dot(a, b)
    return torch.stack([torch.dot(x, y) for x, y in zip(a.split(DOT_CHUNK), b.split(DOT_CHUNK), strict=True)]).sum()


class FusedCosine(torch.autograd.Function):
    """1 − Σ w_l⟨g_l, t_l⟩ / (√Σ w_l‖g_l‖² · T) for trial tensors g (differentiable once: its backward is not
    differentiated again), target tensors t and T = √Σ w_l‖t_l‖². On CPU its dot products run on one BLAS thread
    (:func:`blas_on_one_thread`: the forward over ResNet-18's 11 M parameters on 2 cores takes 10–12 ms
    against 22–25 ms on two threads)."""

    @staticmethod
    def forward(ctx, target: list[torch.Tensor], weights: list[float], target_norm: torch.Tensor,
                *trial: torch.Tensor) -> torch.Tensor:
        with blas_on_one_thread():  # MKL only: nothing changes for CUDA tensors
            dot = sum(w * accurate_dot(g, t) for w, g, t in zip(weights, trial, target, strict=True))
            trial_sq = sum(w * accurate_dot(g, g) for w, g in zip(weights, trial, strict=True))
        denominator = (torch.sqrt(trial_sq) * target_norm).clamp_min(1e-30)
        ctx.save_for_backward(dot, trial_sq, denominator, *trial)
        ctx.target, ctx.weights = target, weights
        return 1 - dot / denominator

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        # ∂/∂g_l = w_l (−t_l / D + ⟨g, t⟩ g_l / (D ‖g‖²)), D the denominator
        dot, trial_sq, denominator, *trial = ctx.saved_tensors
        a, b = -grad / denominator, grad * dot / (denominator * trial_sq.clamp_min(1e-30))
        out = [torch.mul(t, a * w).addcmul_(g, b * w) for w, g, t in zip(ctx.weights, trial, ctx.target, strict=True)]
        return (None, None, None, *out)


def weighted_norm(target: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return torch.sqrt(sum(w * t.pow(2).sum() for w, t in zip(weights, target, strict=True)))


class GradientDistance:
    """``l2``: Σ_l w_l ‖g'_l − g_l‖²; ``cosine``: 1 − Σ w_l⟨g'_l, g_l⟩ / (√Σ w_l‖g'_l‖² · √Σ w_l‖g_l‖²)."""

    def __init__(self, target: list[torch.Tensor], loss: str, weights: str) -> None:
        self.target, self.loss = [t.detach() for t in target], loss
        self.weights = layer_weights(len(target), weights)
        self.target_norm = weighted_norm(self.target, self.weights)
        self.fused = loss == "cosine" and sum(t.numel() for t in self.target) >= FUSED_MIN_ELEMENTS

    def __call__(self, trial: list[torch.Tensor]) -> torch.Tensor:
        if self.fused:
            return FusedCosine.apply(self.target, self.weights, self.target_norm, *trial)
        return gradient_distance(trial, self.target, self.weights, self.loss, self.target_norm)
