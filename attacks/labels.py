"""Label recovery from the last fully connected layer's gradient — its own stage.

The registry names every way an attack gets labels: read off the gradient (``idlg``, ``yin``,
``lrb``, ``bias-count``: a :class:`LabelSignal` → K labels, sorted ascending as GradInversion and AFGI pair them),
optimised jointly with the images (``joint``, DLG's soft labels) or handed the true ones (``oracle``,
ablations). An entry also says what it needs of the model's structure.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from fl_sim.base.registry import Registry
from fl_sim.observation import features


class LabelRecoveryError(ValueError):
    """A strategy that cannot run on this model / batch (the message says why)."""


@dataclass(frozen=True)
class LabelSignal:
    """What label recovery reads: ``fc_grad`` (num_classes, h) — the last FC weight gradient, or for
    FedAvg the weight change θ₀ − θ_T (same sign pattern) — the number of labels K to return, and the model
    (the client's replayed forward: its BatchNorm mode).

    ``bias_grads`` (num_classes,): the last FC bias gradient summed over the client's ``steps`` local steps of
    ``step_batch`` examples (FedSGD: the gradient; FedAvg with plain SGD: (b₀ − b_T) / lr), or None when unknown;
    ``image_shape`` (C, H, W): the model's input; ``end_state``: FedAvg's returned state (the end of the path the
    client's weights took)."""

    fc_grad: torch.Tensor
    batch_size: int
    model: nn.Module
    bias_grads: torch.Tensor | None = None
    steps: int = 1
    step_batch: int = 0
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) the model takes
    end_state: dict[str, torch.Tensor] | None = None  # FedAvg: the client's state after its local steps


@dataclass(frozen=True)
class LabelParams:
    gamma: float = 0.4  # LRB probability-gap threshold
    scale: float = 1e7  # LRB input scale Con
    probes: int = 8  # bias-count: random batches through the model to estimate its mean softmax output
    seed: int = 0


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


@from_gradient("idlg", "iDLG's sign rule (K > 1: the K most negative rows; K > classes: repeated in rank order)")
def idlg(signal: LabelSignal, _: LabelParams) -> torch.Tensor:
    """iDLG: the label whose row of ∂L/∂W_fc sums most negative (exact for K = 1 with ≥ 0 features);
    for K > 1 the K most negative rows (the extension RAF-GI compares against)."""
    row_sums = signal.fc_grad.sum(dim=1)
    return torch.sort(_first(torch.argsort(row_sums), signal.batch_size)).values


@from_gradient("yin", "GradInversion's row-minimum (distinct labels; K > classes: repeated in rank order)")
def yin(signal: LabelSignal, _: LabelParams) -> torch.Tensor:
    """GradInversion (Yin et al. 2021): the K labels with the smallest row-minimum (distinct labels)."""
    row_min = signal.fc_grad.min(dim=1).values
    return torch.sort(_first(torch.argsort(row_min), signal.batch_size)).values


def _first(ranking: torch.Tensor, k: int) -> torch.Tensor:
    """The first k of a class ranking; past the number of classes, the ranking again (K labels always)."""
    return ranking.repeat(-(-k // len(ranking)))[:k]


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


def classifier_bias(model: nn.Module) -> nn.Linear:
    """The last linear layer, which must have a bias (what the bias-gradient count reads)."""
    _, fc = last_linear(model)
    if fc.bias is None:
        raise LabelRecoveryError("needs a bias in the model's last linear layer")
    return fc


def mean_softmax(model: nn.Module, batch: int, probes: int, shape: tuple[int, ...], seed: int,
                 state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """p̄ (num_classes,): the model's softmax output (with ``state``, default its own) averaged over ``probes``
    batches of N(0, 1) inputs in its input space, each of ``batch`` images (in the client's BatchNorm mode, so
    train-mode layers normalise each probe batch as they did the client's). The forward runs on copies of the
    buffers: train-mode BatchNorm leaves the model's running statistics as they were."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    state = {k: v.detach().clone() for k, v in (model.state_dict() if state is None else state).items()}
    with torch.no_grad():
        probs = [torch.softmax(functional_call(model, state, (torch.randn((max(batch, 2), *shape), generator=gen)
                                                              .to(device),)), -1).mean(0) for _ in range(probes)]
    return torch.stack(probs).mean(0).cpu().double()


def summed_softmax(signal: LabelSignal, batch: int, params: LabelParams, points: int = 8) -> torch.Tensor:
    """Σ_t p̄(θ_t) over the client's local steps (num_classes,): at the global model for one step; for several,
    the mean over up to ``points`` models θ_t = θ₀ + (t / T)·(θ_T − θ₀), t < T, times T."""
    assert signal.image_shape is not None
    if signal.steps == 1 or signal.end_state is None:
        return signal.steps * mean_softmax(signal.model, batch, params.probes, signal.image_shape, params.seed)
    start = signal.model.state_dict()
    steps = np.unique(np.linspace(0, signal.steps - 1, min(points, signal.steps)).round())
    total = torch.zeros((), dtype=torch.float64)
    for t in steps:
        f = float(t) / signal.steps
        on_path = {k: v + f * (signal.end_state[k].to(v) - v) if v.is_floating_point() else v for k, v in start.items()}
        total = total + mean_softmax(signal.model, batch, params.probes, signal.image_shape, params.seed, on_path)
    return signal.steps * total / len(steps)


def round_to_total(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers summing to ``total`` closest to ``counts`` (largest remainders)."""
    c = counts.clamp_min(0)
    c = c * (total / c.sum()) if float(c.sum()) > 0 else torch.full_like(c, total / len(c))
    base = c.floor().long()
    rest = total - int(base.sum())
    if rest > 0:
        base[torch.argsort(c - base, descending=True)[:rest]] += 1
    return base


@from_gradient("bias-count", "Geng et al. 2021 / Wainakh et al. 2022: counts n_c = B·(p̄_c − ∂L/∂b_c), duplicates "
               "included", requires=classifier_bias)
def bias_count(signal: LabelSignal, params: LabelParams) -> torch.Tensor:
    """Label counts from the classifier's bias gradient. For mean cross-entropy over a batch of B,
    ∂L/∂b_c = p̄_c − n_c / B, so n_c = B·(p̄_c − ∂L/∂b_c), with p̄ the batch's mean softmax output, estimated by
    feeding the model random batches (:func:`mean_softmax`). Over T local steps of B (FedAvg, plain SGD) the summed
    gradient gives the counts over every step, n_c = B·(Σ_t p̄_c(θ_t) − Σ_t ∂L_t/∂b_c), with θ_t on the straight
    path from the global to the returned weights. Rescaled to the K images reconstructed (epochs revisit them)
    and rounded to K labels by largest remainders."""
    if signal.bias_grads is None or signal.image_shape is None:
        raise LabelRecoveryError("bias-count needs the classifier's bias gradient (or the FedAvg bias change)")
    b = signal.step_batch or signal.batch_size
    p_sum = summed_softmax(signal, b, params)
    counts = b * (p_sum - signal.bias_grads.detach().cpu().double())  # over every step: epochs count images again
    counts = round_to_total(counts, signal.batch_size)  # rescaled to the K images
    return torch.repeat_interleave(torch.arange(len(counts)), counts)

