"""Label recovery from the last fully connected layer's gradient — its own stage.

Each strategy maps a :class:`LabelSignal` to K labels (sorted ascending, as GradInversion and
AFGI pair them). ``joint`` (DLG's soft labels) and ``oracle`` are handled by the attack itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fl_sim import features
from fl_sim.registry import Registry


class LabelRecoveryError(ValueError):
    """A strategy that cannot run on this model / batch (the message says why)."""


@dataclass(frozen=True)
class LabelSignal:
    """What label recovery reads: ``fc_grad`` (num_classes, h) — the last FC weight gradient, or for
    FedAvg the weight change θ₀ − θ_T (same sign pattern) — the batch size K, and the model."""

    fc_grad: torch.Tensor
    batch_size: int
    model: nn.Module


LabelStrategy = Callable[[LabelSignal, "LabelParams"], torch.Tensor]
LABEL_STRATEGIES: Registry[LabelStrategy] = Registry("label strategy")


@dataclass(frozen=True)
class LabelParams:
    gamma: float = 0.4  # LRB probability-gap threshold
    scale: float = 1e7  # LRB input scale Con


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(name, module) of the classifier: the last nn.Linear in module order."""
    try:
        return features.last_linear(model)
    except ValueError:
        raise LabelRecoveryError("label recovery needs a model whose last layer is nn.Linear") from None


@LABEL_STRATEGIES.register("idlg")
def idlg(signal: LabelSignal, _: LabelParams) -> torch.Tensor:
    """iDLG: the label whose row of ∂L/∂W_fc sums most negative (exact for K = 1 with ≥ 0 features);
    for K > 1 the K most negative rows (the extension RAF-GI compares against)."""
    row_sums = signal.fc_grad.sum(dim=1)
    return torch.sort(torch.argsort(row_sums)[: signal.batch_size]).values


@LABEL_STRATEGIES.register("yin")
def yin(signal: LabelSignal, _: LabelParams) -> torch.Tensor:
    """GradInversion (Yin et al. 2021): the K labels with the smallest row-minimum (distinct labels)."""
    row_min = signal.fc_grad.min(dim=1).values
    return torch.sort(torch.argsort(row_min)[: signal.batch_size]).values


def lrb_head(model: nn.Module) -> nn.Module:
    """LRB's network: the model's last block, average pool and FC, sharing the model's weights."""
    layer4, avgpool, fc = (getattr(model, n, None) for n in ("layer4", "avgpool", "fc"))
    if not isinstance(layer4, nn.Sequential) or avgpool is None or not isinstance(fc, nn.Linear):
        raise LabelRecoveryError("lrb needs a model whose last residual block feeds average pooling and the "
                                 "classifier (resnet18, resnet50)")
    return nn.Sequential(layer4[-1], avgpool, nn.Flatten(), fc).eval()


@LABEL_STRATEGIES.register("lrb")
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
