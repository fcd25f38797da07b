"""K independent gradient-matching problems in one batched computation.

The K problems (the attacked clients of one round, or restarts) share the global model and the
recipe; each has its own target gradient, labels and start. Per problem, the client's gradient is
``torch.func.grad`` of its loss with ``functional_call``; ``vmap`` runs all K at once and
``grad_and_value`` gives each problem the gradient of its own objective w.r.t. its candidates —
instead of K double-backward graphs. Adam is elementwise, so one Adam over the stacked
(K, N, C, H, W) candidates is K Adams; every problem keeps its own trace, early stop and failure
(a stopped problem's candidates are frozen). Results equal the one-by-one ``optimize`` up to float
rounding, amplified by the optimiser (tested at small budgets).

Train-mode BatchNorm uses each problem's own batch statistics (``replace_all_batch_norm_modules_``:
running statistics are never read or written, as the one-by-one simulator leaves them). With
``recipe.compile`` the vmapped step is one ``torch.compile``d graph (the double backward traced out). Small
models on CPU (``small_on_cpu``) take the same step through K replicas of the model in one
(attacks.replicas: plain autograd on K-times wider layers; LeNet, K = 8: 2.7-3.2x the one-by-one time against
vmap's 1.9-2.0x, benchmarks/batched_attacks.py), unless the model has a layer the replicas cannot express.

Opt-in (``batched = true`` in the attack entry): a batched result equals the one-by-one result only up
to float rounding, and an optimiser amplifies that over a budget (GGI's signed Adam the most: a gradient
element near zero flips sign under a different summation order and a signed step is a whole step;
measured up to 5e-2 on the LeNet and 0.2 on ResNet-18 apart over a full budget), so by default each
client is solved on its own and its reconstruction never depends on who else was attacked.

Not batchable (``unbatchable`` says why; those run one by one): L-BFGS (its line search and curvature
history couple everything it optimises), unrolled FedAvg updates, the Canny edge prior (OpenCV),
the BatchNorm-statistics prior (forward hooks), and eager models of a million parameters and more on CPU: vmap's
double backward there is slower than K one-by-one solves (ResNet-18, 32 px, K = 8: 0.71-0.77x of their speed,
benchmarks/batched_attacks.py).
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from attacks.matching import gradient_distance, layer_weights, weighted_norm
from attacks.optimize import KEEP_MARGIN, Monitor, Trial, clipped, divergence, stalled, step_schedule
from attacks.recipe import Recipe
from attacks.regularizers import Prior, with_priors
from attacks.replicas import replicate
from fl_sim.base.cpu import cpu_kernels, small_on_cpu
from fl_sim.observation import Observation


@dataclass
class Problem:
    """One reconstruction: ``target`` per-layer gradients, hard ``labels`` (N,) or None (joint soft
    labels from ``logits0``), start ``z0`` (N, C, H, W) in the model's input space."""

    target: list[torch.Tensor]
    labels: torch.Tensor | None
    z0: torch.Tensor
    logits0: torch.Tensor | None


def unbatchable(recipe: Recipe, observations: list[Observation], model: nn.Module) -> str | None:
    """Why these observations cannot be solved as one batch under ``recipe`` (None: they can)."""
    if recipe.optimizer != "adam":
        return "L-BFGS couples the problems it optimises together"
    if any(o.kind != "gradient" for o in observations):
        return "unrolled FedAvg updates are replayed one by one"
    if recipe.edge or recipe.bn_stats or recipe.bn_forward != "batch":
        return "the edge (OpenCV) and BatchNorm-statistics priors and the client BatchNorm statistics run one by one"
    if len({o.meta.batch_size for o in observations}) > 1 or len({o.server_round for o in observations}) > 1:
        return "the problems differ in batch size or global model"
    device = next(model.parameters()).device
    if not recipe.compile and device.type == "cpu" and not small_on_cpu(model, device):
        return ("on CPU, eager, a model of a million parameters and more runs faster one problem per core "
                "(fl_sim.base.cpu.one_per_core) than vmapped")
    return None


class BatchedMatching:
    """Solve K FedSGD gradient-matching problems that share the global model of ``obs``."""

    def __init__(self, model: nn.Module, obs: Observation, recipe: Recipe, priors: list[Prior],
                 device: torch.device) -> None:
        self.recipe, self.priors, self.norm = recipe, priors, obs.normalization
        model = copy.deepcopy(model).to(device)
        model.load_state_dict({k: v.to(device) for k, v in obs.global_state.items()})
        model.train()
        if obs.meta.batchnorm == "train":  # batch statistics only; running statistics never touched
            torch.func.replace_all_batch_norm_modules_(model)
        else:
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if device.type == "cpu":
            cpu_kernels(model, autograd=False)  # vmapped or compiled
        self.model, self.device = model, device
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        self.buffers = {n: b for n, b in model.named_buffers()}
        self.weights = layer_weights(len(self.params), recipe.layer_weights)
        ones = torch.ones(1, obs.image_shape[0], 1, 1, device=device)
        self.bounds = (self.norm.normalize(ones * 0), self.norm.normalize(ones))

    def _client_gradient(self, z: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """∂L/∂θ of the client's loss on candidates z (N, C, H, W) with labels / probabilities y."""
        def loss(theta: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(functional_call(self.model, (theta, self.buffers), (z,)), y)

        grads = torch.func.grad(loss)(self.params)
        return [grads[n] for n in self.params]

    def _replica_step(self, replica: nn.Module, z: torch.Tensor, labels: torch.Tensor, targets: list[torch.Tensor],
                      norms: torch.Tensor) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                                                    tuple[torch.Tensor, torch.Tensor]]:
        """The vmapped step's result — ∂objective/∂z (and ∂/∂label logits when joint), (objectives, distances) —
        for all K problems through the replicated model (attacks.replicas): z (K, N, C, H, W)."""
        k, n = z.shape[:2]
        joint = labels.is_floating_point()
        z = z.detach().requires_grad_(True)
        logits = labels.detach().requires_grad_(True) if joint else None
        out = F.log_softmax(replica(z.transpose(0, 1).reshape(n, -1, *z.shape[3:])).view(n, k, -1), dim=-1)
        if logits is not None:  # soft labels: cross-entropy against softmax(logits), as F.cross_entropy
            losses = -(F.softmax(logits, dim=-1).transpose(0, 1) * out).sum(-1).mean(0)
        else:
            losses = -out.gather(-1, labels.T[..., None]).squeeze(-1).mean(0)  # (K,): each problem's mean loss
        grads = torch.autograd.grad(losses.sum(), list(replica.parameters()), create_graph=True)
        trial = [g.view(k, *t.shape[1:]) for g, t in zip(grads, targets, strict=True)]
        matched = gradient_distance(trial, targets, self.weights, self.recipe.loss, norms, batched=True)
        objective = matched + vmap(lambda zk: with_priors(self.priors, zk, self.norm))(z)
        wrt = (z, logits) if logits is not None else (z,)
        found = torch.autograd.grad(objective.sum(), wrt)
        return (found if logits is not None else found[0]), (objective.detach(), matched.detach())

    def _objective(self, z: torch.Tensor, label: torch.Tensor, target: list[torch.Tensor],
                   target_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One problem's (objective, gradient distance); ``label`` is hard labels (N,) or label logits
        (N, classes) when joint."""
        y = F.softmax(label, dim=-1) if label.is_floating_point() else label
        matched = gradient_distance(self._client_gradient(z, y), target, self.weights, self.recipe.loss, target_norm)
        return matched + with_priors(self.priors, z, self.norm), matched

    def solve(self, problems: list[Problem], monitor: Monitor | None = None, monitor_every: int = 10) -> list[Trial]:
        """``monitor(iteration, z of problem 0)`` → stop all? (benchmarks' time-to-quality, as in ``optimize``)."""
        r, k = self.recipe, len(problems)
        joint = problems[0].labels is None
        z = torch.stack([p.z0 for p in problems]).to(self.device)
        labels = torch.stack([p.logits0 if joint else p.labels for p in problems]).to(self.device)
        targets = [torch.stack(layer).to(self.device) for layer in zip(*(p.target for p in problems), strict=True)]
        norms = torch.stack([weighted_norm([t.to(self.device) for t in p.target], self.weights) for p in problems])
        step = vmap(grad_and_value(self._objective, argnums=(0, 1) if joint else 0, has_aux=True))
        if r.compile:  # one graph of forward, client gradient, distance and ∂/∂z (no autograd at run time)
            step = torch.compile(step, dynamic=False)
        elif small_on_cpu(self.model, self.device):
            replica = replicate(self.model, k, tuple(problems[0].z0.shape), r.seed)  # faster than vmap there
            if replica is not None:
                step = functools.partial(self._replica_step, replica)
        params = [z] + ([labels] if joint else [])
        opt = torch.optim.Adam(params, lr=r.lr)
        scheduler = step_schedule(opt, r)
        trials = [Trial(z[i], None) for i in range(k)]
        active = torch.ones(k, dtype=torch.bool, device=self.device)
        frozen = [p.detach().clone() for p in params]
        best_loss = torch.full((k,), math.inf, device=self.device)
        best = [p.detach().clone() for p in params]  # each problem's iterate with the lowest objective
        for i in range(r.iterations):
            grads, (losses, _) = step(z, labels, targets, norms)
            with torch.no_grad():
                better = active & torch.isfinite(losses) & ~(losses >= best_loss - KEEP_MARGIN * best_loss.abs())
                best_loss = torch.where(better, losses, best_loss)
                for b, p in zip(best, params, strict=True):
                    b.copy_(torch.where(better.view(-1, *[1] * (p.ndim - 1)), p, b))
            grads = grads if joint else (grads,)
            for p, g in zip(params, grads, strict=True):
                p.grad = g.sign() if r.signed else g
            opt.step()
            everyone = bool(active.all())  # the masked copies below are whole copies (or none) then
            if not everyone:
                with torch.no_grad():
                    for p, f in zip(params, frozen, strict=True):  # stopped problems stay where they stopped
                        p[~active] = f[~active]
            values = losses.detach().cpu().tolist()
            finite_z = torch.isfinite(z.detach().flatten(1)).all(1).cpu().tolist()
            for j in torch.nonzero(active).flatten().cpu().tolist():
                trial = trials[j]
                trial.iterations = i + 1
                if (failure := divergence(values[j], i + 1, finite_z[j])) is not None:  # kept as it is after this step
                    trial.failure = failure
                    active[j] = False
                    with torch.no_grad():
                        for p, f in zip(params, frozen, strict=True):
                            f[j] = p[j]
                    continue
                trial.trace.append(values[j])
            with torch.no_grad():
                everyone = everyone and bool(active.all())
                if r.clip:
                    if everyone:
                        z.copy_(clipped(z, self.bounds))
                    else:
                        z[active] = clipped(z, self.bounds)[active]
                for p, f in zip(params, frozen, strict=True):
                    if everyone:
                        f.copy_(p)
                    else:
                        f[active] = p[active]
            for j in torch.nonzero(active).flatten().cpu().tolist():
                if stalled(trials[j].trace, r.early_stop, r.patience):
                    active[j] = False
            if scheduler is not None:
                scheduler.step()
            if monitor is not None and (i + 1) % monitor_every == 0 and monitor(i + 1, z[0].detach().clone()):
                break
            if not active.any():
                break
        with torch.no_grad():
            final, _ = vmap(self._objective)(z, labels, targets, norms)
            use_final = torch.isfinite(final) & ~(best_loss < final - KEEP_MARGIN * final.abs())
            for b, p in zip(best, params, strict=True):
                b[use_final] = p[use_final]
            kept_loss, kept_score = vmap(self._objective)(best[0], best[1] if joint else labels, targets, norms)
        for j, trial in enumerate(trials):
            trial.z = best[0][j].detach() if trial.failure is None else z[j].detach()
            trial.label_logits = (best[1] if trial.failure is None else labels)[j].detach() if joint else None
            if trial.failure is None:
                trial.loss, trial.score = float(kept_loss[j]), float(kept_score[j])
                if not (math.isfinite(trial.loss) and math.isfinite(trial.score)):
                    trial.failure = f"final loss is {trial.loss}"
        return trials
