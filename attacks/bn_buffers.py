"""The client's BatchNorm statistics, recovered from the buffers it returns with its update.

A train-mode BatchNorm layer with momentum m updates its buffers on every local step t with the batch's
statistics s_t (mean, and the *unbiased* variance): r_{t+1} = (1 − m)·r_t + m·s_t. The server sent r_0 (the
global model) and receives r_T, so it knows

    Σ_t w_t·s_t / Σ_t w_t = (r_T − (1 − m)^T·r_0) / (1 − (1 − m)^T),   w_t = m·(1 − m)^(T−1−t),

which after one step (FedSGD, or FedAvg with one local step) is exactly the batch's mean and variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fl_sim.observation import Observation


class BuffersUnavailable(ValueError):
    """The observation does not carry usable BatchNorm buffers (the message says why)."""


@dataclass(frozen=True)
class ClientStatistics:
    """One BatchNorm layer: the w-weighted mean over the client's T local steps of its batches' channel means and
    unbiased variances, (C,) each, and the weights w_t (T,) normalised to sum to 1 (a single 1 after one step)."""

    name: str
    mean: torch.Tensor
    var: torch.Tensor
    weights: torch.Tensor


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(name, module) of every BatchNorm layer, in module order (the order a forward pass meets them)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def client_statistics(model: nn.Module, obs: Observation, steps: int) -> list[ClientStatistics]:
    """Every BatchNorm layer's statistics from the buffers in ``obs`` (``steps``: the client's local steps)."""
    layers = batchnorm_layers(model)
    if not layers:
        raise BuffersUnavailable("the model has no BatchNorm layer")
    if obs.meta.batchnorm != "train":
        raise BuffersUnavailable("the client trains BatchNorm in eval mode: its buffers do not change")
    out = []
    for name, module in layers:
        keys = [f"{name}.running_mean", f"{name}.running_var"]
        if any(k not in obs.update or k not in obs.global_state for k in keys):
            raise BuffersUnavailable(f"the client's update carries no BatchNorm buffers for '{name}'")
        if module.momentum is None:
            raise BuffersUnavailable(f"'{name}' keeps a cumulative average (momentum None), not a running one")
        m = float(module.momentum)
        decay = (1 - m) ** steps
        mean, var = ((obs.update[k].double() - decay * obs.global_state[k].double()) / (1 - decay) for k in keys)
        w = torch.tensor([m * (1 - m) ** (steps - 1 - t) for t in range(steps)], dtype=torch.float64)
        out.append(ClientStatistics(name, mean.float(), var.float(), (w / w.sum()).float()))
    return out


def batch_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel mean and biased variance of a BatchNorm input x (B, C, ...), as train-mode BatchNorm uses them."""
    dims = [0, *range(2, x.ndim)]
    return x.mean(dims), x.var(dims, unbiased=False)


def unbiased(var: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The biased variance of x's channels as the unbiased one BatchNorm keeps in its buffers."""
    n = x.numel() // x.shape[1]
    return var * n / max(n - 1, 1)


class _NormalizeWith(torch.autograd.Function):
    """y = γ·(x − μ)/√(σ² + ε) + β with given statistics μ, σ² (C,), and train-mode BatchNorm's backward:
    ∂x = γ/√(σ² + ε)·(g − mean(g) − x̂·mean(g·x̂)), means over every dimension but the channel. The backward is
    written in differentiable operations, so gradient matching can differentiate it again."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, var, eps):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + eps) * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        x, weight, mean, var = ctx.saved_tensors
        shape = (1, -1) + (1,) * (x.ndim - 2)
        dims = [0, *range(2, x.ndim)]
        rstd = torch.rsqrt(var.view(shape) + ctx.eps)
        xhat = (x - mean.view(shape)) * rstd
        gx = weight.view(shape) * rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))
        return gx, (g * xhat).sum(dims), g.sum(dims), None, None, None


class ClientStatsBatchNorm(nn.Module):
    """Train-mode BatchNorm replayed with the client's statistics: the forward normalises with the client's batch
    mean and (biased) variance, the backward is train-mode BatchNorm's (through the statistics) at those values.
    At the client's own batch both are exactly the client's; every candidate is normalised as that batch was.

    Keeps the wrapped layer's parameter and buffer names (functional_call sees the same state dict)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, stats: ClientStatistics) -> None:
        super().__init__()
        if bn.weight is None:
            raise BuffersUnavailable("BatchNorm without affine parameters is not supported")
        self.weight, self.bias = bn.weight, bn.bias
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(key, getattr(bn, key))
        self.eps = bn.eps
        self.register_buffer("client_mean", stats.mean.clone(), persistent=False)
        self.register_buffer("client_var", stats.var.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biased = self.client_var * (1 - 1 / max(x.numel() // x.shape[1], 2))  # BatchNorm divides by the biased one
        return _NormalizeWith.apply(x, self.weight, self.bias, self.client_mean, biased, self.eps)


def use_client_statistics(model: nn.Module, stats: list[ClientStatistics]) -> None:
    """Replace (in place) every BatchNorm layer of ``model`` by a ClientStatsBatchNorm with its statistics."""
    by_name = {s.name: s for s in stats}
    for name, module in batchnorm_layers(model):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, ClientStatsBatchNorm(module, by_name[name]))
