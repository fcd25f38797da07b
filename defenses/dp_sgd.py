"""DP-SGD (Abadi et al. 2016) with Opacus: per-sample gradients clipped to C, Gaussian noise σ·C on their sum.

It replaces the client's local optimisation: FedSGD sends the privatised mean gradient of its batch
(Opacus's ``DPOptimizer.pre_step``), FedAvg takes its local steps with the ``DPOptimizer``. Opacus
cannot compute per-sample gradients through BatchNorm, so a scenario with dp-sgd builds its global
model through ``ModuleValidator.fix`` (BatchNorm → GroupNorm): the model the server — and so the
attacker — sees is that fixed model, for every client and round.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from defenses.base import Accountant, Params, Participation, TrainingDefense, Update, rdp_epsilon


class DpSgdParams(Params):
    sigma: float = Field(1.0, ge=0, description="noise multiplier: noise σ·C on the sum of clipped per-sample grads")
    clip: float = Field(1.0, gt=0, description="C: bound on each per-sample gradient's L2 norm")
    delta: float = Field(1e-5, gt=0, lt=1, description="δ of the (ε, δ) budget the report states")


class DpSgd(TrainingDefense, Accountant):
    params: DpSgdParams

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
                                expected_batch_size=len(batches[0]),
                                generator=torch.Generator(device=device).manual_seed(seed))
        losses = []
        for batch in batches:
            x, y = pool.batch(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(private(norm.normalize(x.to(device))), y.to(device))
            with warnings.catch_warnings():  # Opacus's hooks on the first layer, whose input needs no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            losses.append(float(loss.detach()))
            if fedsgd:  # clip, noise and average; the privatised gradient is what the client sends
                optimizer.pre_step()
                update = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
                return update | {n: b.detach().clone() for n, b in model.named_buffers()}, losses[0]
            optimizer.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}, float(np.mean(losses))

    def epsilon(self, p: Participation) -> float:
        """Example-level ε at δ: ``rounds × sample_rate`` expected participations of ``steps_per_round``
        DP-SGD steps, each sampling a ``batch_rate`` fraction of the shard (Opacus's RDP accountant)."""
        steps = max(1, round(p.rounds * p.sample_rate * p.steps_per_round))
        return rdp_epsilon(self.params.sigma, p.batch_rate, steps, self.params.delta)
