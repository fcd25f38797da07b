"""Replay a client's local computation as a differentiable function of candidate data.

FedSGD: the gradient of the client's loss at the global weights. FedAvg: the local SGD steps
unrolled (Geiping et al. 2020, §5) — θ_{t+1} = θ_t − lr·(momentum buffer of ∇L(θ_t; batch_t)),
and the update θ₀ − θ_T is matched against the observed one; Δθ / lr is never treated as a
gradient when there is more than one step. The attacker knows the protocol (steps, batch size,
lr, momentum, local epochs) but not the client's batch order: it reconstructs N = min(steps · batch,
examples) images and replays them in a fixed order (per epoch, or wrapping around; :func:`step_schedule`).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from attacks.bn_buffers import ClientStatistics, ClientStatsBatchNorm, batch_statistics, unbiased, use_client_statistics
from fl_sim.base.cpu import cpu_kernels
from fl_sim.observation import Observation, ProtocolMeta


class UnsupportedObservation(ValueError):
    """The observation's protocol cannot be replayed (e.g. Adam local training)."""


def step_schedule(meta: ProtocolMeta, n: int, steps: int, separate_epochs: bool) -> tuple[list[torch.Tensor], int]:
    """The candidates each replayed step trains on, and how many copies of the N images there are.

    Local epochs (``meta.local_epochs`` passes of ``steps`` in all): each epoch takes the N candidates in
    ceil(N / B) batches, the last one smaller, as the client's shuffled passes do (their order is unknown, so
    one fixed order stands for it); with ``separate_epochs`` epoch e uses its own copy, candidates e·N … e·N + N − 1.
    Local steps: full batches over the N candidates in order, wrapping around."""
    b = meta.batch_size
    if meta.local_epochs > 0 and steps == meta.local_epochs * -(-n // b):
        epoch = [torch.arange(j * b, min((j + 1) * b, n)) for j in range(-(-n // b))]
        copies = meta.local_epochs if separate_epochs else 1
        return [idx + (e * n if copies > 1 else 0) for e in range(meta.local_epochs) for idx in epoch], copies
    return [torch.arange(t * b, t * b + b) % n for t in range(steps)], 1


class ClientSimulator:
    """``sim(z, y)`` → list of tensors comparable with ``sim.target`` (same order as ``sim.names``).

    ``z``: candidate model inputs (N, C, H, W) in the model's (normalized) input space; ``y``: hard
    labels (N,) or class probabilities (N, num_classes).
    """

    def __init__(self, model: nn.Module, obs: Observation, device: torch.device, track_bn: bool = False,
                 client_stats: list[ClientStatistics] | None = None, separate_epochs: bool = False) -> None:
        """``track_bn``: record the candidates' BatchNorm statistics on every forward (for a statistics prior);
        ``client_stats``: train-mode BatchNorm normalises with the client's statistics (attacks.bn_buffers);
        ``separate_epochs``: FedAvg over local epochs replays each epoch on its own copy of the N candidates
        (Dimitrov et al.: ``copies`` = epochs, candidates = copies · N), else one set in every epoch."""
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
        if client_stats is not None:
            use_client_statistics(self.model, client_stats)
        if device.type == "cpu":  # GEMM convolutions, affine eval BatchNorm: cheaper double backwards
            cpu_kernels(self.model)
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
        self.schedule, self.copies = step_schedule(meta, self.num_images, self.steps, separate_epochs)
        self.num_candidates = self.copies * self.num_images
        # per forward of the last call, per BatchNorm layer in order: (candidates' mean, biased variance, input)
        self._bn_seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._bn_running = [(m.running_mean, m.running_var) for m in self.model.modules()
                            if isinstance(m, nn.modules.batchnorm._BatchNorm | ClientStatsBatchNorm)]
        if track_bn:  # only when a BN-statistics prior is used: it costs a mean/var per layer per forward
            for m in self.model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm | ClientStatsBatchNorm):
                    m.register_forward_pre_hook(self._record_bn)

    def _record_bn(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._bn_seen.append((*batch_statistics(inputs[0]), inputs[0]))

    def bn_statistics_loss(self, client: list[ClientStatistics] | None = None) -> torch.Tensor:
        """The BatchNorm-statistics prior on the last call, Σ_layers ‖μ − μ*‖₂ + ‖σ² − σ²*‖₂ (0 without BatchNorm).

        ``client`` None: GradInversion's — the first forward's batch statistics against the global model's running
        statistics. Otherwise against the client's statistics from its buffers: the candidates' statistics mixed
        over the replayed steps with the client's step weights (exactly the batch statistics after one step)."""
        if not self._bn_seen:
            return torch.zeros((), device=self.device)
        layers = len(self._bn_running)
        if client is None:
            return sum((mean - rm).norm() + (var - rv).norm()
                       for (mean, var, _), (rm, rv) in zip(self._bn_seen[:layers], self._bn_running, strict=True))
        total = torch.zeros((), device=self.device)
        for i, target in enumerate(client):
            seen = self._bn_seen[i::layers]
            w = target.weights.to(self.device)
            mean = sum(wt * m for wt, (m, _, _) in zip(w, seen, strict=True))
            var = sum(wt * unbiased(v, x) for wt, (_, v, x) in zip(w, seen, strict=True))
            total = total + (mean - target.mean.to(self.device)).norm() + (var - target.var.to(self.device)).norm()
        return total

    def _loss(self, theta: dict[str, torch.Tensor], z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(self.model, (theta, self.buffers), (z,))
        return F.cross_entropy(logits, y)

    def __call__(self, z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        self._bn_seen = []
        theta = self.theta
        if self.kind == "gradient":
            loss = self._loss(theta, z, y)
            return list(torch.autograd.grad(loss, list(theta.values()), create_graph=True))
        if y.shape[0] != z.shape[0]:  # one label per image, shared by its copies
            if z.shape[0] != self.copies * y.shape[0]:
                raise ValueError(f"{y.shape[0]} labels for {z.shape[0]} candidates ({self.copies} copies)")
            y = y.repeat(self.copies, *([1] * (y.ndim - 1)))
        velocity: list[torch.Tensor] | None = None
        current = list(theta.values())
        for idx in self.schedule:
            idx = idx.to(z.device)
            loss = self._loss(dict(zip(self.names, current, strict=True)), z[idx], y[idx])
            grads = torch.autograd.grad(loss, current, create_graph=True)
            if self.meta.weight_decay:
                grads = tuple(g + self.meta.weight_decay * p for g, p in zip(grads, current, strict=True))
            if self.meta.momentum:
                velocity = list(grads) if velocity is None else [
                    self.meta.momentum * v + g for v, g in zip(velocity, grads, strict=True)]
                grads = tuple(velocity)
            current = [p - self.meta.lr * g for p, g in zip(current, grads, strict=True)]
        return [p0 - p for p0, p in zip(theta.values(), current, strict=True)]

    def label_signal_bias(self, fc_name: str) -> torch.Tensor | None:
        """The last FC bias gradient summed over the local steps (num_classes,), or None without a bias. FedAvg:
        (b₀ − b_T) / lr, less weight decay's pull (taken at b₀); with momentum μ, step s's gradient enters the
        update (1 − μ^(T−s)) / (1 − μ) times, here replaced by the mean of those factors."""
        name = f"{fc_name}.bias"
        if name not in self.names:
            return None
        change = self.target[self.names.index(name)].detach()
        if self.kind == "gradient":
            return change
        meta, steps = self.meta, self.steps
        summed = change / meta.lr  # Σ_s F_s·(g_s + wd·b_s), F_s the momentum factors (1 without momentum)
        if meta.momentum:
            factors = [(1 - meta.momentum ** (steps - s)) / (1 - meta.momentum) for s in range(steps)]
            summed = summed * steps / sum(factors)
        return summed - meta.weight_decay * steps * self.params0[name]

    def label_signal_grad(self, fc_name: str) -> torch.Tensor:
        """The last FC weight gradient (FedSGD) or weight change θ₀ − θ_T (FedAvg), (num_classes, h)."""
        return self.target[self.names.index(f"{fc_name}.weight")].detach()
