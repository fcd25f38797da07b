"""TLDR's loss terms (training-like data reconstruction, §3.3–3.4), each exactly as the paper writes it.

Shapes: ``logits`` (B, K) classifier outputs, ``condition`` (B, K) conditioning distributions,
``features`` (B, D) the classifier's penultimate features, ``images`` (B, C, H, W).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kl_divergence(condition: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """L_KL = D_KL(P ‖ Q) = Σ_i P(i) log(P(i) / Q(i)), P the conditioning distribution, Q the classifier's
    softmax output; mean over the batch (0·log 0 = 0)."""
    return F.kl_div(F.log_softmax(logits, dim=-1), condition, reduction="batchmean")


def cross_entropy(labels: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """L_CE = −Σ_i y_i log ŷ_i with y the encoded (argmax) label; mean over the batch."""
    return F.cross_entropy(logits, labels)


def _cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    unit = F.normalize(features.flatten(1), dim=1)
    return unit @ unit.T


def cosine_similarity(features: torch.Tensor) -> torch.Tensor:
    """L_Cosine = 1 / (N(N − 1)) Σ_{i≠j} cos θ_ij over the batch's features."""
    n = features.shape[0]
    cos = _cosine_matrix(features)
    return (cos.sum() - cos.diagonal().sum()) / (n * (n - 1))


def feature_orthogonality(features: torch.Tensor) -> torch.Tensor:
    """L_Ortho = 1 / N² Σ_{i,j} (G_ij − δ_ij)², G the Gram matrix of the L2-normalised features (so that
    G = I is reachable: unit, mutually orthogonal features)."""
    n = features.shape[0]
    gram = _cosine_matrix(features)
    return (gram - torch.eye(n, device=gram.device, dtype=gram.dtype)).pow(2).sum() / n**2


def variation(images: torch.Tensor) -> torch.Tensor:
    """L_Var = 1/N Σ_i Σ_{h,w} ((I_{i,h+1,w} − I_{i,h,w})² + (I_{i,h,w+1} − I_{i,h,w})²), summed over channels."""
    dh = images[:, :, 1:, :] - images[:, :, :-1, :]
    dw = images[:, :, :, 1:] - images[:, :, :, :-1]
    return (dh.pow(2).sum() + dw.pow(2).sum()) / images.shape[0]


def pixel_range(images: torch.Tensor) -> torch.Tensor:
    """L_Pix = Σ max(0, −I) + Σ max(0, I − 1): pixels outside [0, 1], summed over the batch."""
    return F.relu(-images).sum() + F.relu(images - 1).sum()


def gradient_norm(model: nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_Grad = ‖∇_θ L(f_θ(I), y)‖: the L2 norm of the cross-entropy's gradient w.r.t. all of the classifier's
    weights, kept differentiable w.r.t. the images (``logits`` must come from ``model``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(F.cross_entropy(logits, labels), params, create_graph=True)
    return torch.sqrt(sum(g.pow(2).sum() for g in grads))
