"""DP-SGD (Abadi et al. 2016) with Opacus: per-sample gradients clipped to C, Gaussian noise σ·C on their sum.

It replaces the client's local optimisation: FedSGD sends the privatised mean gradient of its batch
(Opacus's ``DPOptimizer.pre_step``), FedAvg takes its local steps with the ``DPOptimizer``. Opacus
cannot compute per-sample gradients through BatchNorm, so a scenario with dp-sgd builds its global
model through ``ModuleValidator.fix`` (BatchNorm → GroupNorm): the model the server — and so the
attacker — sees is that fixed model, for every client and round. Its batches are Poisson samples of the
shard (``poisson_batches``: the accountant's assumption, as Opacus's DPDataLoader draws them); a step whose
batch came out empty releases noise only, as Opacus does.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defenses.base import Accountant, Budget, Params, Releases, TrainingDefense, Update, epsilon, rdp_epsilon
from defenses.rero import profile_bound


class DpSgdParams(Params):
    sigma: float = Field(1.0, ge=0, description="noise multiplier: noise σ·C on the sum of clipped per-sample grads")
    clip: float = Field(1.0, gt=0, description="C: bound on each per-sample gradient's L2 norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) budget the report states")


class DpSgd(TrainingDefense, Accountant):
    params: DpSgdParams
    poisson_batches = True

    @staticmethod
    def prepare_model(model: nn.Module) -> nn.Module:
        """Opacus's fix for layers it cannot privatise (BatchNorm → GroupNorm); other models unchanged."""
        from opacus.validators import ModuleValidator

        return model if ModuleValidator.is_valid(model) else ModuleValidator.fix(model)

    def local_update(self, model: nn.Module, pool, batches: Sequence[np.ndarray], plan, norm, device: torch.device,
                     seed: int) -> tuple[Update, float]:
        """As :func:`fl_sim.training.local_update`, privatised; noise drawn from a generator seeded by ``seed``."""
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        from fl_sim.training import optimizer_for, set_batchnorm_mode

        model.to(device)
        set_batchnorm_mode(model, plan.batchnorm)
        private = GradSampleModule(model)
        fedsgd = plan.protocol == "fedsgd"
        base = torch.optim.SGD(model.parameters(), lr=plan.lr) if fedsgd else optimizer_for(model, plan)
        optimizer = DPOptimizer(base, noise_multiplier=self.params.sigma, max_grad_norm=self.params.clip,
                                expected_batch_size=plan.batch_size,  # Poisson batches: their expected size
                                generator=torch.Generator(device=device).manual_seed(seed))
        losses = []
        for batch in batches:
            x, y = pool.batch(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(private(norm.normalize(x.to(device))), y.to(device))
            with warnings.catch_warnings():  # Opacus's hooks on the first layer, whose input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            if len(batch):
                losses.append(float(loss.detach()))
            if fedsgd:  # clip, noise and average; the privatised gradient is what the client sends
                optimizer.pre_step()
                update = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
                return update | {n: b.detach().clone() for n, b in model.named_buffers()}, _mean(losses)
            optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, _mean(losses)

    def budget(self, releases: Releases) -> Budget:
        """Example-level (ε, δ): the client's batches are Poisson samples of its shard (each example independently
        with rate q = batch / shard, as Opacus's DPDataLoader draws them), which the server does not see, so every
        DP-SGD step it took is a subsampled Gaussian (Opacus's RDP accountant, noise multiplier σ)."""
        p, r = self.params, releases
        return Budget(rdp_epsilon(p.sigma, r.batch_rate, r.participations * r.steps_per_round, p.delta), p.delta,
                      "example", "add or remove one example of the client's shard",
                      "Opacus RDP: noise multiplier σ, Poisson sample rate batch / shard, every local step")

    def reconstruction_bound(self, releases: Releases, kappa: float) -> float:
        """For an example the attacked update was computed on (the event fl-sim measures, conditioned on the
        sampling): that step is a Gaussian release without subsampling, the client's other steps subsampled
        Gaussians. η from that composition's privacy profile: at each δ of :data:`PROFILE_DELTAS` the smaller ε of
        Opacus's PRV accountant (its upper estimate) and its RDP accountant."""
        p, r = self.params, releases
        steps = r.participations * r.steps_per_round
        history = ((p.sigma, 1.0, min(1, steps)), (p.sigma, r.batch_rate, max(0, steps - 1)))
        return profile_bound(((min(epsilon("prv", history, d), epsilon("rdp", history, d)), d)
                              for d in PROFILE_DELTAS), kappa)


PROFILE_DELTAS = tuple(float(d) for d in np.geomspace(1e-10, 0.5, 31))  # where the privacy profile is read


def _mean(losses: list[float]) -> float:
    return float(np.mean(losses)) if losses else float("nan")  # every batch empty: no loss to report
