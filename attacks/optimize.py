"""The optimisation loop of gradient matching, and the pieces every attack's loop shares: the recipe's
step schedule, the divergence check, the stopping rule and the box constraint."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from attacks.recipe import Recipe
from fl_sim.base.cpu import interrupted

# (z, label logits) → (objective incl. priors, gradient distance alone), both scalars
Objective = Callable[[torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]
Monitor = Callable[[int, torch.Tensor], bool]  # (iteration, current z) → stop? (benchmarks only)
MILESTONES: dict[str, tuple[Callable[[int], list[int]], float]] = {
    # inversefed / breaching's step-lr: n // 2.667, n // 1.6, n // 1.142 (≈ 3/8, 5/8, 7/8)
    "ggi": (lambda n: [int(n // 2.667), int(n // 1.6), int(n // 1.142)], 0.1),
    "afgi": (lambda n: [int(n * f) for f in (2 / 7, 4 / 7, 6 / 7)], 0.2),
}


def step_schedule(opt: torch.optim.Optimizer, recipe: Recipe) -> torch.optim.lr_scheduler.LRScheduler | None:
    """ggi: lr ×0.1 at n // 2.667, n // 1.6, n // 1.142 (breaching); afgi: ×0.2 after each 2/7; none: constant."""
    if recipe.schedule not in MILESTONES:
        return None
    milestones, gamma = MILESTONES[recipe.schedule]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones(recipe.iterations), gamma=gamma)


def divergence(loss: float, iteration: int, finite_candidates: bool = True) -> str | None:
    """Why an optimisation failed at ``iteration`` (its loss or its candidates are not finite), or None."""
    return None if math.isfinite(loss) and finite_candidates else f"loss became {loss} at iteration {iteration}"


def stalled(trace: list[float], epsilon: float, patience: int) -> bool:
    """|Δloss| < ε over the last ``patience`` iterations (never, with ε = 0)."""
    return epsilon > 0 and len(trace) > patience and abs(trace[-1] - trace[-1 - patience]) < epsilon


def clipped(z: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``z`` boxed into [lower, upper] (valid images, in the model's input space)."""
    return torch.maximum(torch.minimum(z, bounds[1]), bounds[0])


KEEP_MARGIN = 1e-3  # an earlier iterate replaces a later one only if its objective is lower by this fraction


def clearly_better(loss: float, than: float) -> bool:
    """``loss`` beats ``than`` by more than KEEP_MARGIN (relative): float-level ties keep the later iterate,
    so which iterate is kept does not hinge on rounding (batched and one-by-one runs keep the same one)."""
    return math.isfinite(loss) and (not math.isfinite(than) or loss < than - KEEP_MARGIN * abs(than))


@dataclass
class Trial:
    """One optimisation run: the kept candidate ``z`` (model-input space: the iterate with the lowest
    objective), its label logits (joint), objective ``loss`` and gradient distance ``score`` (restarts are
    chosen by the score alone, as breaching's restarts.scoring)."""

    z: torch.Tensor
    label_logits: torch.Tensor | None
    loss: float = math.inf
    score: float = math.inf
    trace: list[float] = field(default_factory=list)
    iterations: int = 0
    failure: str | None = None


def optimize(objective: Objective, z0: torch.Tensor, logits0: torch.Tensor | None, recipe: Recipe,
             bounds: tuple[torch.Tensor, torch.Tensor], desc: str = "attack", monitor: Monitor | None = None,
             monitor_every: int = 10) -> Trial:
    """Minimise ``objective(z, label_logits)`` → (objective, gradient distance) from ``z0``; ``bounds`` clip z
    to valid images. The iterate with the lowest objective is kept (the optimisers report the objective at
    the point they step from).

    ``monitor`` (benchmarks' time-to-quality) sees a copy of z every ``monitor_every`` iterations
    and can only stop the run.
    """
    z = z0.clone().requires_grad_(True)
    logits = None if logits0 is None else logits0.clone().requires_grad_(True)
    params = [z] + ([logits] if logits is not None else [])
    line_search = None if recipe.line_search == "none" else recipe.line_search
    opt: torch.optim.Optimizer = (torch.optim.LBFGS(params, lr=recipe.lr, line_search_fn=line_search)
                                  if recipe.optimizer == "lbfgs" else torch.optim.Adam(params, lr=recipe.lr))
    scheduler = step_schedule(opt, recipe)
    trial = Trial(z, logits)
    best = (math.inf, z.detach().clone(), None if logits is None else logits.detach().clone())

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = objective(z, logits)[0]
        loss.backward(inputs=params)  # only the candidates: never the second-order gradient of the weights
        if recipe.signed:
            for p in params:
                if p.grad is not None:
                    p.grad.sign_()
        return loss

    for i in tqdm(range(recipe.iterations), desc=desc, leave=False, disable=None):
        if interrupted():  # this attack runs beside others (fl_sim.base.cpu.one_per_core), whose caller stops
            raise KeyboardInterrupt
        start = (z.detach().clone(), None if logits is None else logits.detach().clone())
        loss = float(opt.step(closure).detach())
        trial.iterations = i + 1
        if (failure := divergence(loss, i + 1, bool(torch.isfinite(z).all()))) is not None:
            trial.failure = failure
            break
        if clearly_better(loss, best[0]):
            best = (loss, *start)
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
        final = [float(v.detach()) for v in objective(z, logits)]  # the objective differentiates internally
        if clearly_better(best[0], final[0]):  # an earlier iterate: its gradient distance is still needed
            trial.z, trial.label_logits = best[1], best[2]
            final = [float(v.detach()) for v in objective(trial.z, trial.label_logits)]
        else:
            trial.z, trial.label_logits = z.detach(), None if logits is None else logits.detach()
        trial.loss, trial.score = final
        if not (math.isfinite(trial.loss) and math.isfinite(trial.score)):
            trial.failure = f"final loss is {trial.loss}"
    else:
        trial.z, trial.label_logits = z.detach(), None if logits is None else logits.detach()
    return trial
