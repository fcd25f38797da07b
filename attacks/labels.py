"""Label recovery from the last fully connected layer's gradient — its own stage.

The registry names every way an attack gets labels: read off the gradient (``idlg``, ``yin``,
``lrb``: a :class:`LabelSignal` → K labels, sorted ascending as GradInversion and AFGI pair them),
optimised jointly with the images (``joint``, DLG's soft labels) or handed the true ones (``oracle``,
ablations). An entry also says what it needs of the model's structure.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from fl_sim.base.registry import Registry
from fl_sim.observation import features


class LabelRecoveryError(ValueError):
    """A strategy that cannot run on this model / batch (the message says why)."""


@dataclass(frozen=True)
class LabelSignal:
    """What label recovery reads: ``fc_grad`` (num_classes, h) — the last FC weight gradient, or for
    FedAvg the weight change θ₀ − θ_T (same sign pattern) — the batch size K, and the model."""

    fc_grad: torch.Tensor
    batch_size: int
    model: nn.Module


@dataclass(frozen=True)
class LabelParams:
    gamma: float = 0.4  # LRB probability-gap threshold
    scale: float = 1e7  # LRB input scale Con


@dataclass(frozen=True)
class LabelStrategy:
    """``source``: where the labels come from; ``recover(signal, params)`` for the gradient strategies;
    ``requires(model)`` raises LabelRecoveryError when the model lacks what the strategy reads."""

    source: Literal["gradient", "joint", "oracle"]
    description: str
    recover: Callable[[LabelSignal, LabelParams], torch.Tensor] | None = None
    requires: Callable[[nn.Module], object] | None = None

    def __call__(self, signal: LabelSignal, params: LabelParams) -> torch.Tensor:
        if self.recover is None:
            raise LabelRecoveryError(f"labels from '{self.source}' are not read off the gradient")
        return self.recover(signal, params)


LABEL_STRATEGIES: Registry[LabelStrategy] = Registry("label strategy")
LABEL_STRATEGIES.add("joint", LabelStrategy("joint", "DLG: soft labels optimised jointly with the images"))
LABEL_STRATEGIES.add("oracle", LabelStrategy("oracle", "the true labels from the simulation (ablations; rows flagged)"))


def from_gradient(name: str, description: str, requires: Callable[[nn.Module], object] | None = None
                  ) -> Callable[[Callable[[LabelSignal, LabelParams], torch.Tensor]], Callable]:
    """Register a strategy that reads the labels off the gradient."""
    def add(fn: Callable[[LabelSignal, LabelParams], torch.Tensor]) -> Callable:
        LABEL_STRATEGIES.add(name, LabelStrategy("gradient", description, fn, requires))
        return fn

    return add


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the classifier: the last nn.Linear in module order."""
    try:
        return features.last_linear(model)
    except ValueError:
        raise LabelRecoveryError("label recovery needs a model whose last layer is nn.Linear") from None


@from_gradient("idlg", "iDLG's sign rule (K > 1: the K most negative rows)")
def idlg(signal: LabelSignal, _: LabelParams) -> torch.Tensor:
    """iDLG: the label whose row of ∂L/∂W_fc sums most negative (exact for K = 1 with ≥ 0 features);
    for K > 1 the K most negative rows (the extension RAF-GI compares against)."""
    row_sums = signal.fc_grad.sum(dim=1)
    return torch.sort(torch.argsort(row_sums)[: signal.batch_size]).values


@from_gradient("yin", "GradInversion's row-minimum (distinct labels)")
def yin(signal: LabelSignal, _: LabelParams) -> torch.Tensor:
    """GradInversion (Yin et al. 2021): the K labels with the smallest row-minimum (distinct labels)."""
    row_min = signal.fc_grad.min(dim=1).values
    return torch.sort(torch.argsort(row_min)[: signal.batch_size]).values


def lrb_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Linear]:
    """The model's last residual block, average pool and FC (what LRB's network is made of)."""
    layer4, avgpool, fc = (getattr(model, n, None) for n in ("layer4", "avgpool", "fc"))
    if not isinstance(layer4, nn.Sequential) or avgpool is None or not isinstance(fc, nn.Linear):
        raise LabelRecoveryError("needs the model's last residual block feeding average pooling and the classifier "
                                 "(as resnet18 and resnet50 have)")
    return layer4[-1], avgpool, fc


def lrb_head(model: nn.Module) -> nn.Module:
    """LRB's network: copies of the model's last block, average pool and FC, in eval mode. Copies, so that
    label recovery leaves the model (whose BatchNorm may replay the client's batch statistics) untouched."""
    block, avgpool, fc = lrb_parts(model)
    return nn.Sequential(copy.deepcopy(block), copy.deepcopy(avgpool), nn.Flatten(), copy.deepcopy(fc)).eval()


@from_gradient("lrb", "AFGI Algorithm 1: row-minima, then duplicates through the last block", requires=lrb_parts)
def lrb(signal: LabelSignal, params: LabelParams) -> torch.Tensor:
    """AFGI Algorithm 1 (RAF-GI's ACB).

    1. L_k (reusing GradInversion, as the paper does): labels whose row-minimum of ∂L/∂W_fc is
       negative, most negative first (at most K).
    2. If k < K: feed G₁ = column-wise sum of ∂L/∂W_fc (one value per feature, shape (1, h, 1, 1))
       scaled by Con through the last block + pool + FC; walk the outputs in decreasing order and
       take a label as a duplicate if it is in L_k and its output exceeds the next one by > γ.
    3. Fill what is still missing with the top labels of L_k, in order.
    """
    grad, k_total = signal.fc_grad, signal.batch_size
    row_min = grad.min(dim=1).values
    order = torch.argsort(row_min)
    found = [int(c) for c in order if row_min[c] < 0][:k_total] or [int(order[0])]
    if len(found) == k_total:
        return torch.tensor(sorted(found))
    head = lrb_head(signal.model)
    g2 = (grad.sum(dim=0) * params.scale).view(1, -1, 1, 1)
    with torch.no_grad():
        scores = head(g2.to(next(head.parameters()).device)).flatten().cpu()
    ranked = torch.argsort(scores, descending=True)
    duplicates: list[int] = []
    for i in range(len(ranked) - 1):
        if len(found) + len(duplicates) == k_total:
            break
        c = int(ranked[i])
        if c in found and float(scores[c] - scores[ranked[i + 1]]) > params.gamma:
            duplicates.append(c)
    m = 0
    while len(found) + len(duplicates) < k_total:
        duplicates.append(found[m % len(found)])
        m += 1
    return torch.tensor(sorted(found + duplicates))
