"""The optimisation loop of gradient matching, and the pieces every attack's loop shares: the recipe's
step schedule, the divergence check, the stopping rule and the box constraint."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from attacks.recipe import Recipe

Objective = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
Monitor = Callable[[int, torch.Tensor], bool]  # (iteration, current z) → stop? (benchmarks only)
MILESTONES = {"ggi": ((3 / 8, 5 / 8, 7 / 8), 0.1), "afgi": ((2 / 7, 4 / 7, 6 / 7), 0.2)}


def step_schedule(opt: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LRScheduler | None:
    """ggi: lr ×0.1 at 3/8, 5/8, 7/8 of the iterations; afgi: ×0.2 after each 2/7; none: constant."""
    if recipe.schedule not in MILESTONES:
        return None
    fractions, gamma = MILESTONES[recipe.schedule]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[int(recipe.iterations * f) for f in fractions],
                                                gamma=gamma)


def divergence(loss: float, iteration: int, finite_candidates: bool = True) -> str | None:
    """Why an optimisation failed at ``iteration`` (its loss or its candidates are not finite), or None."""
    return None if math.isfinite(loss) and finite_candidates else f"loss became {loss} at iteration {iteration}"


def stalled(trace: list[float], epsilon: float, patience: int) -> bool:
    """|Δloss| < ε over the last ``patience`` iterations (never, with ε = 0)."""
    return epsilon > 0 and len(trace) > patience and abs(trace[-1] - trace[-1 - patience]) < epsilon


def clipped(z: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``z`` boxed into [lower, upper] (valid images, in the model's input space)."""
    return torch.maximum(torch.minimum(z, bounds[1]), bounds[0])


@dataclass
class Trial:
    """One optimisation run: final candidate ``z`` (model-input space), label logits (joint), loss."""

    z: torch.Tensor
    label_logits: torch.Tensor | None
    loss: float = math.inf
    trace: list[float] = field(default_factory=list)
    iterations: int = 0
    failure: str | None = None


def optimize(objective: Objective, z0: torch.Tensor, logits0: torch.Tensor | None, recipe: Recipe,
             bounds: tuple[torch.Tensor, torch.Tensor], desc: str = "attack", monitor: Monitor | None = None,
             monitor_every: int = 10) -> Trial:
    """Minimise ``objective(z, label_logits)`` from ``z0``; ``bounds`` clip z to valid images.

    ``monitor`` (benchmarks' time-to-quality) sees a copy of z every ``monitor_every`` iterations
    and can only stop the run.
    """
    z = z0.clone().requires_grad_(True)
    logits = None if logits0 is None else logits0.clone().requires_grad_(True)
    params = [z] + ([logits] if logits is not None else [])
    opt: torch.optim.Optimizer = (torch.optim.LBFGS(params, lr=recipe.lr) if recipe.optimizer == "lbfgs"
                                  else torch.optim.Adam(params, lr=recipe.lr))
    scheduler = step_schedule(opt, recipe)
    trial = Trial(z, logits)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = objective(z, logits)
        loss.backward()
        if recipe.signed:
            for p in params:
                if p.grad is not None:
                    p.grad.sign_()
        return loss

    for i in tqdm(range(recipe.iterations), desc=desc, leave=False, disable=None):
        loss = float(opt.step(closure).detach())
        trial.iterations = i + 1
        if (failure := divergence(loss, i + 1, bool(torch.isfinite(z).all()))) is not None:
            trial.failure = failure
            break
        if recipe.clip:
            with torch.no_grad():
                z.copy_(clipped(z, bounds))
        trial.trace.append(loss)
        if scheduler is not None:
            scheduler.step()
        if monitor is not None and (i + 1) % monitor_every == 0 and monitor(i + 1, z.detach().clone()):
            break
        if stalled(trial.trace, recipe.early_stop, recipe.patience):
            break
    if trial.failure is None:
        trial.loss = float(objective(z, logits).detach())  # the objective differentiates internally
        if not math.isfinite(trial.loss):
            trial.failure = f"final loss is {trial.loss}"
    trial.z, trial.label_logits = z.detach(), None if logits is None else logits.detach()
    return trial
