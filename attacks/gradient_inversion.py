"""Gradient inversion by gradient matching: one engine, paper algorithms as recipes (presets).

    candidate images z ──► ClientSimulator (the client's gradient, or unrolled FedAvg steps)
                       ──► GradientDistance to the observed update + weighted image priors
                       ──► optimize (a trial keeps its lowest-objective iterate; of the restarts the
                           lowest gradient distance wins)
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import ObservationAttack, Reconstruction, Setting
from attacks.batched import BatchedMatching, Problem, unbatchable
from attacks.bn_buffers import BuffersUnavailable, ClientStatistics, batchnorm_layers, client_statistics
from attacks.edges import EdgePrior, baseline_point
from attacks.epochs import EpochTie
from attacks.labels import LABEL_STRATEGIES, LabelParams, LabelRecoveryError, LabelSignal, last_linear
from attacks.matching import GradientDistance
from attacks.optimize import Monitor, Trial, optimize
from attacks.recipe import Recipe, budgeted, uses_bn_buffers
from attacks.regularizers import (
    Prior,
    batch_orthogonality,
    channel_mean_prior,
    l2_norm,
    sixth_power,
    total_variation,
    total_variation_input,
    with_priors,
)
from attacks.simulate import ClientSimulator, UnsupportedObservation
from fl_sim.base.cpu import faster_one_per_core, one_per_core, tuned_for
from fl_sim.base.precision import arithmetic, unavailable
from fl_sim.base.streams import ATTACK_START
from fl_sim.observation import Observation
from fl_sim.observation.capabilities import Capability


class GradientInversion(ObservationAttack):
    """``reconstruct(observation, model)`` for one recipe (dlg, idlg, ggi, afgi, raf-gi, or custom)."""

    batches_clients = True

    def __init__(self, name: str, recipe: Recipe, monitor: Monitor | None = None) -> None:
        """``monitor(iteration, images in [0, 1])`` → stop? — a benchmark hook; it cannot change the result."""
        self.name, self.recipe, self.monitor = name, recipe, monitor

    @property
    def joint_labels(self) -> bool:
        """DLG's soft labels, optimised with the images."""
        return LABEL_STRATEGIES.get(self.recipe.labels).source == "joint"

    @property
    def needs_oracle_labels(self) -> bool:
        return LABEL_STRATEGIES.get(self.recipe.labels).source == "oracle"

    def capabilities(self, setting: Setting) -> frozenset[Capability]:
        """The update replayed on the global model with the protocol's batch size and steps (FedAvg: also the
        reported number of examples, which bounds how many images to reconstruct), plus what the recipe adds."""
        needs = {Capability.UPDATE, Capability.GLOBAL_MODEL, Capability.PROTOCOL}
        if setting.protocol == "fedavg":
            needs.add(Capability.NUM_EXAMPLES)
        if self.needs_oracle_labels:
            needs.add(Capability.ORACLE_LABELS)
        if uses_bn_buffers(self.recipe):
            needs.add(Capability.BN_BUFFERS)
        return frozenset(needs)

    def incompatibility(self, model: nn.Module, setting: Setting) -> str | None:
        r = self.recipe
        requires = LABEL_STRATEGIES.get(r.labels).requires
        try:
            if requires is not None:
                requires(model)
        except LabelRecoveryError as err:
            return f"labels = '{r.labels}' {err}; use labels = 'yin' or 'idlg'"
        if setting.protocol == "fedavg" and setting.optimizer != "sgd":
            return (f"FedAvg with optimizer '{setting.optimizer}' cannot be unrolled by gradient matching; use "
                    "optimizer 'sgd'")
        if uses_bn_buffers(r):
            if not batchnorm_layers(model):
                return "reads the client's BatchNorm buffers, and the model has no BatchNorm layer; use bn_stats = 0"
            if setting.batchnorm != "train":
                return ("reads the client's BatchNorm buffers, which eval-mode clients (training.batchnorm = 'eval') "
                        "leave unchanged; use bn_target = 'global' or bn_stats = 0")
            steps = 1 if setting.protocol == "fedsgd" else setting.local_steps
            if r.bn_forward == "client" and (steps != 1 or setting.local_epochs):
                return ("bn_forward = 'client' needs one local step (the buffers then hold the batch's statistics); "
                        "use bn_forward = 'batch'")
        if r.epochs == "separate" and not (setting.protocol == "fedavg" and setting.local_epochs > 1):
            return ("epochs = 'separate' replays local epochs: it needs training.protocol = 'fedavg' with "
                    "local_epochs > 1")
        if setting.device != "auto":  # 'auto' is known at run time (then a failed reconstruction)
            return unavailable(r.precision, torch.device(setting.device))
        return None

    def reconstruct(self, obs: Observation, model: nn.Module,
                    oracle_labels: torch.Tensor | None = None) -> Reconstruction:
        device = next(model.parameters()).device
        if (why := unavailable(self.recipe.precision, device)) is not None:  # device = 'auto' found no CUDA
            return self._failed(obs, why)
        single = obs.meta.batch_size == 1 and not self.recipe.compile
        side_by_side = single and self.recipe.restarts > 1 and faster_one_per_core(model, device, True,
                                                                                   self.recipe.restarts)
        with tuned_for(model, device, single_image=single and not side_by_side):
            if self.recipe.compile and oracle_labels is None and unbatchable(self.recipe, [obs], model) is None:
                return self._reconstruct_batched([obs], model, device)[0]  # compiling needs the functional step
            return self._reconstruct(obs, model, oracle_labels, side_by_side)

    def _simulator(self, model: nn.Module, obs: Observation, device: torch.device,
                   client: list[ClientStatistics] | None) -> ClientSimulator:
        r = self.recipe
        return ClientSimulator(model, obs, device, track_bn=r.bn_stats > 0,
                               client_stats=client if r.bn_forward == "client" else None,
                               separate_epochs=r.epochs == "separate")

    def _reconstruct(self, obs: Observation, model: nn.Module, oracle_labels: torch.Tensor | None,
                     side_by_side: bool = False) -> Reconstruction:
        """``side_by_side``: the restarts one per core (fl_sim.base.cpu.one_per_core), each thread with its own
        simulator (functional_call swaps the model's parameters in place)."""
        start, r = time.perf_counter(), self.recipe
        device = next(model.parameters()).device
        try:
            client = self._client_statistics(model, obs)
            sim = self._simulator(model, obs, device, client)
            labels = self._labels(sim, obs, oracle_labels)
        except (UnsupportedObservation, LabelRecoveryError, BuffersUnavailable) as err:
            return self._failed(obs, str(err), time.perf_counter() - start)
        r = budgeted(r, sim.num_images)
        norm = obs.normalization
        ones = torch.ones(1, obs.image_shape[0], 1, 1, device=device)
        bounds = (norm.normalize(ones * 0), norm.normalize(ones))
        distance = GradientDistance(sim.target, r.loss, r.layer_weights)
        priors = self._priors(sim, obs)
        simulators = {threading.get_ident(): sim}

        def trial(k: int) -> Trial:
            """Restart k from its own seeded start."""
            here = threading.get_ident()
            if here not in simulators:  # a worker of one_per_core
                simulators[here] = self._simulator(model, obs, device, client)
            mine, tie = simulators[here], EpochTie(sim.copies, sim.num_images, labels)

            def objective(z: torch.Tensor, logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
                y = labels if logits is None else F.softmax(logits, dim=-1)
                matched = distance(mine(z, y))
                loss = matched + with_priors(priors, z, norm)
                if r.bn_stats:
                    loss = loss + r.bn_stats * mine.bn_statistics_loss(client if r.bn_target == "client" else None)
                if mine.copies > 1 and r.epoch_prior:
                    loss = loss + r.epoch_prior * tie(z)
                return loss, matched

            gen = torch.Generator().manual_seed(ATTACK_START.seed(r.seed, k, obs.server_round, obs.client))
            z0 = self._init(sim.num_candidates, obs, gen).to(device)
            logits0 = (torch.randn(sim.num_images, obs.num_classes, generator=gen).to(device)
                       if self.joint_labels else None)
            with arithmetic(r.precision, device):
                found = optimize(objective, z0, logits0, r, bounds, monitor=self._watch(obs),
                                 desc=f"{self.name} round {obs.server_round} client {obs.client}")
            if sim.copies > 1:  # the epochs' copies merged into the N images
                found = dataclasses.replace(found, z=tie.merged(found.z))
            return found

        restarts = range(r.restarts)
        trials = one_per_core(trial, restarts) if side_by_side else [trial(k) for k in restarts]
        return self._result(trials, labels, obs, time.perf_counter() - start)

    def _failed(self, obs: Observation, why: str, seconds: float = 0.0) -> Reconstruction:
        """No images: the attack could not run on ``obs`` (``why``)."""
        return Reconstruction(torch.zeros(0, *obs.image_shape), None, self.recipe.labels, failure=why, seconds=seconds)

    def _watch(self, obs: Observation) -> Monitor | None:
        """The benchmark monitor on images in [0, 1] (the optimisers hand it z in the model's input space)."""
        if self.monitor is None:
            return None
        return lambda i, z: self.monitor(i, obs.normalization.denormalize(z).clamp(0, 1).cpu())

    def _result(self, trials: list[Trial], labels: torch.Tensor | None, obs: Observation,
                seconds: float) -> Reconstruction:
        """The trial with the lowest gradient distance (restarts), as images in [0, 1] and its labels."""
        good = [t for t in trials if t.failure is None]
        best = min(good, key=lambda t: t.score) if good else trials[0]
        images = obs.normalization.denormalize(best.z).clamp(0, 1).cpu()
        found = best.label_logits.argmax(-1) if best.label_logits is not None else labels
        return Reconstruction(images, None if found is None else found.cpu(), self.recipe.labels, best.trace,
                              best.iterations, seconds, None if good else best.failure)

    def reconstruct_many(self, observations: list[Observation], model: nn.Module) -> list[Reconstruction]:
        """Every observation of one round, all restarts included, as one batched optimisation when the
        recipe asks for it (``batched``) and allows it (attacks.batched); otherwise each alone — on CPU, eager, a
        model of a million parameters and more on single images side by side, one observation per core, when
        there are at least as many as cores (fl_sim.base.cpu.one_per_core; batches keep all threads each); with
        fewer, each observation's restarts side by side (``reconstruct``)."""
        device = next(model.parameters()).device
        alone = len(observations) * self.recipe.restarts < 2 and not self.recipe.compile
        if alone or not self.recipe.batched or unbatchable(self.recipe, observations, model) is not None:
            single = all(o.meta.batch_size == 1 for o in observations)
            if not self.recipe.compile and faster_one_per_core(model, device, single, len(observations)):
                return one_per_core(lambda obs: self.reconstruct(obs, model), observations)
            return [self.reconstruct(obs, model) for obs in observations]
        if (why := unavailable(self.recipe.precision, device)) is not None:
            return [self._failed(obs, why) for obs in observations]
        with tuned_for(model, device):
            return self._reconstruct_batched(observations, model, device)

    def _reconstruct_batched(self, observations: list[Observation], model: nn.Module,
                             device: torch.device) -> list[Reconstruction]:
        start, r = time.perf_counter(), self.recipe
        problems: list[Problem] = []
        owners: list[int] = []
        failures: dict[int, Reconstruction] = {}
        priors: list[Prior] = []
        for i, obs in enumerate(observations):
            try:
                sim = ClientSimulator(model, obs, device)
                labels = self._labels(sim, obs, None)
            except (UnsupportedObservation, LabelRecoveryError) as err:
                failures[i] = self._failed(obs, str(err))
                continue
            priors = self._priors(sim, obs)
            for k in range(r.restarts):
                gen = torch.Generator().manual_seed(ATTACK_START.seed(r.seed, k, obs.server_round, obs.client))
                z0 = self._init(sim.num_images, obs, gen)
                logits0 = torch.randn(sim.num_images, obs.num_classes, generator=gen) if self.joint_labels else None
                problems.append(Problem(sim.target, labels, z0, logits0))
                owners.append(i)
        matching = BatchedMatching(model, observations[0], budgeted(r, observations[0].meta.batch_size), priors, device)
        with arithmetic(r.precision, device):
            trials = matching.solve(problems, self._watch(observations[0])) if problems else []
        seconds = (time.perf_counter() - start) / len(observations)
        out: list[Reconstruction] = []
        for i, obs in enumerate(observations):
            if i in failures:
                out.append(failures[i])
                continue
            mine = [t for t, owner in zip(trials, owners, strict=True) if owner == i]
            out.append(self._result(mine, problems[owners.index(i)].labels, obs, seconds))
        return out

    def _client_statistics(self, model: nn.Module, obs: Observation) -> list[ClientStatistics] | None:
        """The client's BatchNorm statistics from its buffers, when the recipe uses them (else None)."""
        if not uses_bn_buffers(self.recipe):
            return None
        steps = 1 if obs.kind == "gradient" else obs.meta.local_steps
        if self.recipe.bn_forward == "client" and steps != 1:
            raise BuffersUnavailable(f"bn_forward = 'client' needs one local step (the buffers then hold the batch's "
                                     f"statistics); the client took {steps}: use bn_forward = 'batch' with "
                                     "bn_target = 'client'")
        return client_statistics(model, obs, steps)

    def _labels(self, sim: ClientSimulator, obs: Observation, oracle: torch.Tensor | None) -> torch.Tensor | None:
        r = self.recipe
        strategy = LABEL_STRATEGIES.get(r.labels)
        if strategy.source == "joint":
            return None
        if strategy.source == "oracle":
            if oracle is None:
                raise LabelRecoveryError("labels = 'oracle' needs the true labels from the simulation (ablation only)")
            if len(oracle) != sim.num_images:
                raise LabelRecoveryError(f"labels = 'oracle': the client used {len(oracle)} distinct images, the "
                                         f"replay has {sim.num_images} (its local steps drew some images twice)")
            found = oracle
        else:
            fc_name, _ = last_linear(sim.model)
            signal = LabelSignal(sim.label_signal_grad(fc_name), sim.num_images, sim.model,
                                 sim.label_signal_bias(fc_name), sim.steps, obs.meta.batch_size, obs.image_shape,
                                 obs.update if obs.kind == "weights" else None)
            found = strategy(signal, LabelParams(r.lrb_gamma, r.lrb_scale, seed=r.seed))
        if sim.steps > 1:  # a seeded order: the replay's batches neither sorted by class nor in the client's order
            gen = torch.Generator().manual_seed(ATTACK_START.seed(r.seed, 0, obs.server_round, obs.client))
            found = found[torch.randperm(len(found), generator=gen)]
        return found.to(sim.device)

    def _priors(self, sim: ClientSimulator, obs: Observation) -> list[Prior]:
        r = self.recipe
        tv = (r.tv, total_variation_input, "input") if r.tv_space == "input" else (r.tv, total_variation, "image")
        priors: list[Prior] = [
            tv, (r.mean_prior, channel_mean_prior(r.mean_prior_value), "image"),
            (r.sixth_power, sixth_power, "image"), (r.l2, l2_norm, "image"),
            (r.orthogonality, batch_orthogonality, "image")]
        if r.edge:
            fc_name, _ = last_linear(sim.model)
            point = baseline_point(sim.label_signal_grad(fc_name), *obs.image_shape[1:], r.edge_beta)
            priors.append((r.edge, EdgePrior(point, r.edge_theta1, r.edge_theta2), "image"))
        return [p for p in priors if p[0] > 0]

    def _init(self, n: int, obs: Observation, gen: torch.Generator) -> torch.Tensor:
        """Initial candidates in the model's input space: U(0, 1) image, N(0, 1), or mid-gray."""
        shape = (n, *obs.image_shape)
        if self.recipe.init == "gaussian":
            return torch.randn(shape, generator=gen)
        x = torch.rand(shape, generator=gen) if self.recipe.init == "uniform" else torch.full(shape, 0.5)
        return obs.normalization.normalize(x)
