"""Replay a client's local computation as a differentiable function of candidate data.

FedSGD: the gradient of the client's loss at the global weights. FedAvg: the local SGD steps
unrolled (Geiping et al. 2020, §5) — θ_{t+1} = θ_t − lr·(momentum buffer of ∇L(θ_t; batch_t)),
and the update θ₀ − θ_T is matched against the observed one; Δθ / lr is never treated as a
gradient when there is more than one step. The attacker knows the protocol (steps, batch size,
lr, momentum) but not the client's batch order: it reconstructs N = min(steps · batch, examples)
images and replays full batches over them in order (wrapping around for local epochs).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from fl_sim.observation import Observation


class UnsupportedObservation(ValueError):
    """The observation's protocol cannot be replayed (e.g. Adam local training)."""


class ClientSimulator:
    """``sim(z, y)`` → list of tensors comparable with ``sim.target`` (same order as ``sim.names``).

    ``z``: candidate model inputs (N, C, H, W) in the model's (normalized) input space; ``y``: hard
    labels (N,) or class probabilities (N, num_classes).
    """

    def __init__(self, model: nn.Module, obs: Observation, device: torch.device, track_bn: bool = False) -> None:
        meta = obs.meta
        if obs.kind == "weights" and meta.optimizer != "sgd":
            raise UnsupportedObservation(f"FedAvg local training with '{meta.optimizer}' cannot be unrolled; "
                                         "gradient matching supports SGD (with momentum / weight decay)")
        self.model = copy.deepcopy(model).to(device)
        self.model.load_state_dict({k: v.to(device) for k, v in obs.global_state.items()})
        self.model.train()
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0  # batch statistics as the client used them; running stats left untouched
                if meta.batchnorm == "eval":
                    m.eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params0 = {n: p.detach() for n, p in self.model.named_parameters()}
        # leaves we differentiate with respect to; autograd.grad never accumulates into them, so
        # one set serves every call (no per-iteration copy of the weights)
        self.theta = {n: p.clone().requires_grad_(True) for n, p in self.params0.items()}
        self.buffers = {n: b for n, b in self.model.named_buffers()}
        self.kind, self.meta, self.device = obs.kind, meta, device
        update = {k: v.to(device) for k, v in obs.update.items()}
        if obs.kind == "gradient":
            self.target = [update[n] for n in self.names]
            self.num_images, self.steps = meta.batch_size, 1
        else:
            self.target = [self.params0[n] - update[n] for n in self.names]
            self.num_images = min(meta.local_steps * meta.batch_size, meta.num_examples)
            self.steps = meta.local_steps
        self._bn_stats: list[torch.Tensor] = []
        self._capture = False
        if track_bn:  # only when the BN-statistics prior is used: it costs a mean/var per layer per forward
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.register_forward_pre_hook(self._record_bn)

    def _record_bn(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if self._capture:
            x = inputs[0]
            dims = [0] + list(range(2, x.ndim))
            mean, var = x.mean(dims), x.var(dims, unbiased=False)
            self._bn_stats.append((mean - module.running_mean).norm() + (var - module.running_var).norm())

    def bn_statistics_loss(self) -> torch.Tensor:
        """GradInversion's BN prior on the first forward pass of the last call (0 without BatchNorm)."""
        return torch.stack(self._bn_stats).sum() if self._bn_stats else torch.zeros((), device=self.device)

    def _loss(self, theta: dict[str, torch.Tensor], z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, (theta, self.buffers), (z,))
        return F.cross_entropy(logits, y)

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        self._bn_stats, self._capture = [], True
        theta = self.theta
        if self.kind == "gradient":
            loss = self._loss(theta, z, y)
            self._capture = False
            return list(torch.autograd.grad(loss, list(theta.values()), create_graph=True))
        b, n = self.meta.batch_size, z.shape[0]
        velocity: list[torch.Tensor] | None = None
        current = list(theta.values())
        for t in range(self.steps):
            idx = torch.arange(t * b, t * b + b, device=z.device) % n
            loss = self._loss(dict(zip(self.names, current, strict=True)), z[idx], y[idx])
            self._capture = False
            grads = torch.autograd.grad(loss, current, create_graph=True)
            if self.meta.weight_decay:
                grads = tuple(g + self.meta.weight_decay * p for g, p in zip(grads, current, strict=True))
            if self.meta.momentum:
                velocity = list(grads) if velocity is None else [
                    self.meta.momentum * v + g for v, g in zip(velocity, grads, strict=True)]
                grads = tuple(velocity)
            current = [p - self.meta.lr * g for p, g in zip(current, grads, strict=True)]
        return [p0 - p for p0, p in zip(theta.values(), current, strict=True)]

    def label_signal_grad(self, fc_name: str) -> torch.Tensor:
        """The last FC weight gradient (FedSGD) or weight change θ₀ − θ_T (FedAvg), (num_classes, h)."""
        return self.target[self.names.index(f"{fc_name}.weight")].detach()
