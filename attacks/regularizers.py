"""Image priors for gradient matching. Each maps images (B, C, H, W) to a scalar: [0, 1] images, except
``total_variation_input`` (the model-input tensor, as breaching applies TV)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from fl_sim.observation import Normalization

Regularizer = Callable[[torch.Tensor], torch.Tensor]
Prior = tuple[float, Regularizer, Literal["image", "input"]]  # (weight, term, what it reads)


def with_priors(priors: Sequence[Prior], z: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Σ weight · term over the priors: image terms read the [0, 1] image, input terms the model input z."""
    x = norm.denormalize(z) if any(space == "image" for _, _, space in priors) else z
    return sum((w * term(z if space == "input" else x) for w, term, space in priors), torch.zeros((), device=z.device))


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """mean |x[..., :, 1:] − x[..., :, :-1]| + mean |x[..., 1:, :] − x[..., :-1, :]| (as inversefed)."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


def total_variation_input(z: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """breaching's TotalVariation (p = q = 1) on the model-input tensor z: forward differences with a zero pad
    after the last row / column, mean over (B, C, H, W) of (|dx| + eps) + (|dy| + eps)."""
    dx = F.pad(z, (0, 1, 0, 0))[..., :, 1:] - z
    dy = F.pad(z, (0, 0, 0, 1))[..., 1:, :] - z
    return ((dx.abs() + eps) + (dy.abs() + eps)).mean()


def channel_mean_prior(prior: Sequence[float]) -> Regularizer:
    """AFGI R_mean: ‖mean over pixels of each channel − prior‖₂, averaged over the batch."""
    def term(x: torch.Tensor) -> torch.Tensor:
        target = torch.tensor(prior, dtype=x.dtype, device=x.device)[: x.shape[1]]
        return (x.mean(dim=(2, 3)) - target).norm(dim=1).mean()

    return term


def sixth_power(x: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Σ x⁶ per image, averaged over the batch (``reduction = "sum"``: summed over it, as feature inversion)."""
    per_image = x.pow(6).flatten(1).sum(1)
    return per_image.sum() if reduction == "sum" else per_image.mean()


def squared_variation(x: torch.Tensor) -> torch.Tensor:
    """Σ (x_i − x_{i+1})² over horizontally and vertically neighbouring pixels of the whole batch."""
    return (x[..., 1:, :] - x[..., :-1, :]).pow(2).sum() + (x[..., :, 1:] - x[..., :, :-1]).pow(2).sum()


def l2_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖₂ per image, averaged over the batch."""
    return x.flatten(1).norm(dim=1).mean()


def batch_orthogonality(x: torch.Tensor) -> torch.Tensor:
    """Mean squared cosine similarity between distinct images of the batch (0 for a batch of 1)."""
    if x.shape[0] < 2:
        return x.sum() * 0
    flat = torch.nn.functional.normalize(x.flatten(1), dim=1)
    gram = flat @ flat.T
    off = gram - torch.diag_embed(torch.diagonal(gram))
    return off.pow(2).sum() / (x.shape[0] * (x.shape[0] - 1))
