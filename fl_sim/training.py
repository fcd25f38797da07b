"""Local training as clients do it, and evaluation of a model on an image set."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from flwr.app import ConfigRecord
from torch import nn

from fl_sim.data.images import ImageSet
from fl_sim.observation import Normalization

if TYPE_CHECKING:
    from fl_sim.scenario import TrainingConfig


@dataclass(frozen=True)
class LocalTraining:
    """The training instruction the server sends with each round (its ConfigRecord wire format)."""

    protocol: str
    lr: float
    batch_size: int
    local_steps: int
    local_epochs: int
    optimizer: str
    momentum: float
    weight_decay: float
    batchnorm: str

    @staticmethod
    def from_scenario(t: TrainingConfig) -> LocalTraining:
        return LocalTraining(t.protocol, t.lr, t.batch_size, t.local_steps, t.local_epochs, t.optimizer, t.momentum,
                             t.weight_decay, t.batchnorm)

    def to_record(self) -> ConfigRecord:
        return ConfigRecord(asdict(self))

    @staticmethod
    def from_record(record: ConfigRecord) -> LocalTraining:
        return LocalTraining(**{k: record[k] for k in LocalTraining.__dataclass_fields__})


def set_batchnorm_mode(model: nn.Module, mode: str) -> None:
    """model.train(), with BatchNorm layers in eval mode (running statistics) if ``mode == 'eval'``."""
    model.train()
    if mode == "eval":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def local_update(model: nn.Module, pool: ImageSet, batches: Sequence[np.ndarray], plan: LocalTraining,
                 norm: Normalization, device: torch.device) -> tuple[dict[str, torch.Tensor], float]:
    """Train on ``batches`` from the global weights in ``model`` (modified in place).

    Returns (update, mean loss). FedSGD: parameter gradients of the mean cross-entropy on the one
    batch, plus buffers after the forward pass. FedAvg: the full state dict after the local steps.
    """
    model.to(device)
    set_batchnorm_mode(model, plan.batchnorm)
    if plan.protocol == "fedsgd":
        [batch] = batches
        x, y = pool.batch(batch)
        loss = F.cross_entropy(model(norm.normalize(x.to(device))), y.to(device))
        names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad], strict=True)
        grads = torch.autograd.grad(loss, params)
        update = {n: g.detach() for n, g in zip(names, grads, strict=True)}
        update |= {n: b.detach().clone() for n, b in model.named_buffers()}
        return update, float(loss.detach())
    opt = optimizer_for(model, plan)
    losses = []
    for batch in batches:
        x, y = pool.batch(batch)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(norm.normalize(x.to(device))), y.to(device))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(np.mean(losses))


def optimizer_for(model: nn.Module, plan: LocalTraining) -> torch.optim.Optimizer:
    if plan.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=plan.momentum, weight_decay=plan.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, pool: ImageSet, indices: np.ndarray | None, norm: Normalization,
             device: torch.device, batch_size: int = 256) -> tuple[float, float, int]:
    """(mean cross-entropy, accuracy, examples) of ``model`` in eval mode."""
    model.to(device).eval()
    idx = np.arange(len(pool)) if indices is None else np.asarray(indices)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(idx), batch_size):
        x, y = pool.batch(idx[start : start + batch_size])
        logits = model(norm.normalize(x.to(device)))
        loss_sum += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
        correct += int((logits.argmax(1).cpu() == y).sum())
    n = max(1, len(idx))
    return loss_sum / n, correct / n, len(idx)
