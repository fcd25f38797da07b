"""Penultimate-layer features and their magnitude pruning — what a feature-sharing client sends.

The features h (B, F) of a batch are the input of the model's last linear layer, computed with the
global model in eval mode (inference, as an edge device offloading it would). Pruning with ratio r
removes, per example, the ⌊r·F⌋ neurons with the lowest activation; the server receives exactly the
kept values (B, K) and their neuron indices (B, K), K = F − ⌊r·F⌋, sorted by index.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

FEATURES_RECORD = "features"  # the reply's ArrayRecord with "values" and "indices"


@dataclass(frozen=True)
class SharedFeatures:
    values: torch.Tensor  # (B, K) kept activations
    indices: torch.Tensor  # (B, K) int64 neuron indices into the F features, ascending
    dim: int  # F, the number of features before pruning

    @property
    def ratio(self) -> float:
        return 1 - self.values.shape[1] / self.dim


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the model's last nn.Linear (the classifier)."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("the model has no nn.Linear layer, so no penultimate features")
    return linears[-1]


def penultimate(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """(B, F): the input of the last linear layer for the (normalised) ``inputs``; differentiable."""
    _, layer = last_linear(model)
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda mod, args, out: captured.append(args[0]))
    try:
        model(inputs)
    finally:
        handle.remove()
    return captured[0].flatten(1)


def kept_count(dim: int, ratio: float) -> int:
    return dim - math.floor(ratio * dim + 1e-9)


def prune(features: torch.Tensor, ratio: float) -> SharedFeatures:
    """Keep, per example, the F − ⌊ratio·F⌋ largest activations of ``features`` (B, F)."""
    keep = kept_count(features.shape[1], ratio)
    top = features.topk(keep, dim=1).indices.sort(dim=1).values
    return SharedFeatures(features.gather(1, top).detach().clone(), top, features.shape[1])


def reprune(shared: SharedFeatures, ratio: float) -> SharedFeatures:
    """Prune already-shared features further, to ``ratio`` of the original F (never less than shared)."""
    keep = min(shared.values.shape[1], kept_count(shared.dim, ratio))
    order = shared.values.topk(keep, dim=1).indices.sort(dim=1).values
    return SharedFeatures(shared.values.gather(1, order), shared.indices.gather(1, order), shared.dim)
