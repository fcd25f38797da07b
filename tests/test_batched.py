"""K gradient-matching problems in one batched optimisation equal the one-by-one attack."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest
import torch
from torch.func import grad_and_value, vmap

from attacks.batched import BatchedMatching, unbatchable
from attacks.gradient_inversion import GradientInversion
from attacks.matching import GradientDistance, weighted_norm
from attacks.recipe import recipe
from attacks.replicas import replicate
from attacks.simulate import ClientSimulator
from fl_sim.data.sources import load_dataset
from fl_sim.leakage.single_client import fedsgd_plan, observe
from fl_sim.models import build_model
from fl_sim.scenario import DataConfig, ModelConfig


def round_of(model_name: str, clients: int):
    """``clients`` observations of one round: the same global model, one CIFAR image each."""
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    model = build_model(ModelConfig(name=model_name), 10, (3, 32, 32), seed=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    out = []
    for i in range(clients):
        model.load_state_dict(state)
        obs, _ = observe(model, data.train, [np.array([i])], fedsgd_plan(), data.normalization, 10)
        out.append(dataclasses.replace(obs, client=i, global_state=state))
    return model, out


@pytest.mark.parametrize("preset, overrides", [
    ("ggi", {}),                                                     # signed Adam, TV on the input, schedule
    ("ggi", {"signed": False, "restarts": 2}),                       # restarts are problems too
    ("dlg", {"optimizer": "adam", "lr": 0.1}),                       # joint soft labels
    ("afgi", {"edge": 0.0, "early_stop": 1e-3, "patience": 3}),      # per-problem early stop
])
def test_a_batched_round_equals_the_clients_attacked_one_by_one(preset, overrides):
    """The opt-in batched path (``batched = true``): equal up to float drift the optimiser amplifies."""
    model, observations = round_of("lenet", 3)
    attack = GradientInversion(preset, recipe(preset, iterations=40, batched=True, **overrides))
    assert unbatchable(attack.recipe, observations, model) is None
    one_by_one = [attack.reconstruct(o, model) for o in observations]
    batched = attack.reconstruct_many(observations, model)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a.failure is None and b.failure is None
        torch.testing.assert_close(b.images, a.images, rtol=0, atol=2e-2)  # measured up to 8.7e-3 (restarts)
        assert b.iterations == a.iterations and len(b.loss_trace) == len(a.loss_trace)
        np.testing.assert_allclose(b.loss_trace, a.loss_trace, rtol=1e-3, atol=1e-6)  # float32 rounding, amplified
        assert torch.equal(b.labels, a.labels)
    if overrides.get("early_stop"):
        assert {r.iterations for r in one_by_one} != {40}  # early stop did happen, per problem


def test_by_default_a_clients_reconstruction_does_not_depend_on_who_else_is_attacked():
    model, observations = round_of("lenet", 3)
    attack = GradientInversion("ggi", recipe("ggi", iterations=30, signed=False))
    alone = attack.reconstruct(observations[1], model)
    together = attack.reconstruct_many(observations, model)[1]
    assert torch.equal(alone.images, together.images) and alone.loss_trace == together.loss_trace


def test_what_cannot_be_batched_runs_one_by_one_and_says_why():
    model, observations = round_of("lenet", 2)
    assert "L-BFGS" in unbatchable(recipe("dlg"), observations, model)
    assert "edge" in unbatchable(recipe("afgi"), observations, model)
    fedavg = [dataclasses.replace(o, kind="weights") for o in observations]
    assert "FedAvg" in unbatchable(recipe("ggi"), fedavg, model)
    attack = GradientInversion("dlg", recipe("dlg", iterations=2))
    one_by_one = [attack.reconstruct(o, model) for o in observations]
    for a, b in zip(one_by_one, attack.reconstruct_many(observations, model), strict=True):
        assert torch.equal(a.images, b.images)


def test_train_mode_batchnorm_uses_each_problems_own_batch_statistics():
    """ResNet-18 with the client's train-mode BatchNorm: the batched objective and its gradient w.r.t. the
    candidates equal the one-by-one simulator's for every problem. In float64: at batch 1 the deep BatchNorm
    layers make ∂loss/∂z ill-conditioned, and float32 vmap rounding differs by up to 2e-3 relative."""
    model, observations = round_of("resnet18", 2)
    model = model.double()
    observations = [dataclasses.replace(
        o, global_state={k: v.double() if v.is_floating_point() else v for k, v in o.global_state.items()},
        update={k: v.double() for k, v in o.update.items()}) for o in observations]
    r = recipe("ggi")
    assert "one problem per core" in unbatchable(r, observations, model)  # on CPU, eager: not vmapped
    assert unbatchable(r.model_copy(update={"compile": True}), observations, model) is None
    matching = BatchedMatching(model, observations[0], r, [], torch.device("cpu"))
    sims = [ClientSimulator(model, o, torch.device("cpu")) for o in observations]
    z = torch.randn(2, 1, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels = torch.stack([sim.label_signal_grad("fc").sum(1).argmin().reshape(1) for sim in sims])
    targets = [torch.stack(layer) for layer in zip(*(sim.target for sim in sims), strict=True)]
    norms = torch.stack([weighted_norm(sim.target, matching.weights) for sim in sims])
    dz, (loss, _) = vmap(grad_and_value(matching._objective, has_aux=True))(z, labels, targets, norms)
    for j, sim in enumerate(sims):
        zj = z[j].clone().requires_grad_(True)
        expected = GradientDistance(sim.target, r.loss, r.layer_weights)(sim(zj, labels[j]))
        (grad,) = torch.autograd.grad(expected, zj)
        torch.testing.assert_close(loss[j], expected.detach(), rtol=1e-10, atol=0)
        assert float((dz[j] - grad).norm() / grad.norm()) < 1e-10
    assert abs(float(loss[0] - loss[1])) > 1e-3  # two different problems


def test_a_compiled_step_equals_the_eager_one():
    """recipe.compile: one client goes through the compiled functional step, with the eager result."""
    model, observations = round_of("lenet", 1)
    eager = GradientInversion("ggi", recipe("ggi", iterations=30, signed=False)).reconstruct(observations[0], model)
    compiled = GradientInversion("ggi", recipe("ggi", iterations=30, signed=False, compile=True)).reconstruct(
        observations[0], model)
    assert compiled.failure is None and compiled.iterations == eager.iterations
    torch.testing.assert_close(compiled.images, eager.images, rtol=0, atol=1e-3)
    np.testing.assert_allclose(compiled.loss_trace, eager.loss_trace, rtol=1e-4, atol=1e-6)


def _float64(model, observations):
    model = model.double()
    return model, [dataclasses.replace(
        o, global_state={k: v.double() if v.is_floating_point() else v for k, v in o.global_state.items()},
        update={k: v.double() for k, v in o.update.items()}) for o in observations]


@pytest.mark.parametrize("model_name, preset, batchnorm", [
    ("lenet", "ggi", "train"),                                 # hard labels, TV prior
    ("lenet", "dlg", "train"),                                 # joint soft labels: ∂/∂ label logits too
    ("convnet", "ggi", "train"),                               # BatchNorm on each problem's batch statistics
    ("convnet", "ggi", "eval"),                                # BatchNorm on the running statistics
])
def test_the_replicated_model_step_equals_the_vmapped_one(model_name, preset, batchnorm):
    """Small models on CPU solve K problems through K replicas in one model (attacks/replicas.py): its objective,
    distance and gradients equal the vmapped step's, in float64."""
    model, observations = round_of(model_name, 3)
    observations = [dataclasses.replace(o, meta=dataclasses.replace(o.meta, batchnorm=batchnorm))
                    for o in observations]
    model, observations = _float64(model, observations)
    r = recipe(preset, optimizer="adam", lr=0.1)
    attack = GradientInversion(preset, r)
    sims = [ClientSimulator(model, o, torch.device("cpu")) for o in observations]
    matching = BatchedMatching(model, observations[0], r, attack._priors(sims[0], observations[0]),
                               torch.device("cpu"))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 1, 3, 32, 32, generator=gen, dtype=torch.float64)
    joint = preset == "dlg"
    labels = (torch.randn(3, 1, 10, generator=gen, dtype=torch.float64) if joint
              else torch.tensor([[3], [1], [7]]))
    targets = [torch.stack(layer) for layer in zip(*(sim.target for sim in sims), strict=True)]
    norms = torch.stack([weighted_norm(sim.target, matching.weights) for sim in sims])
    replica = replicate(matching.model, 3, (1, 3, 32, 32))
    assert replica is not None
    grads, (objective, matched) = matching._replica_step(replica, z, labels, targets, norms)
    expected, (objective0, matched0) = vmap(grad_and_value(
        matching._objective, argnums=(0, 1) if joint else 0, has_aux=True))(z, labels, targets, norms)
    torch.testing.assert_close(objective, objective0, rtol=1e-10, atol=0)
    torch.testing.assert_close(matched, matched0, rtol=1e-10, atol=0)
    for ours, theirs in zip(grads if joint else (grads,), expected if joint else (expected,), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-8, atol=1e-12)
    assert len(set(objective.tolist())) == 3  # three different problems


def test_a_model_the_replicas_cannot_express_is_refused():
    class MixesChannels(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)) - self.conv(x).mean())  # a mean over all channels

    assert replicate(MixesChannels(), 2, (1, 3, 8, 8)) is None
    norm_layer = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.Flatten(),
                                     torch.nn.Linear(4 * 36, 10))
    assert replicate(norm_layer, 2, (1, 3, 8, 8)) is None  # a parameterised layer it has no replica of
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 36, 10))
    assert replicate(plain, 2, (1, 3, 8, 8)) is not None


def test_on_cpu_a_large_models_clients_are_attacked_side_by_side_with_the_results_of_one_by_one(monkeypatch,
                                                                                                  torch_threads):
    """ResNet-18 on CPU, eager, single images: reconstruct_many solves the round's clients one per core
    (one_per_core) — two threads at once, PyTorch's and MKL's counts 1 inside — and returns exactly what one by one
    does (on 2 threads); fewer clients than threads run one by one."""
    model, observations = round_of("resnet18", 3)
    attack = GradientInversion("ggi", recipe("ggi", iterations=3))
    torch_threads(2)
    one_by_one = [attack.reconstruct(o, model) for o in observations]
    seen, reconstruct = [], GradientInversion.reconstruct

    def watched(self, obs, model, oracle_labels=None):
        seen.append((threading.get_ident(), torch.get_num_threads()))
        return reconstruct(self, obs, model, oracle_labels)

    monkeypatch.setattr(GradientInversion, "reconstruct", watched)
    side_by_side = attack.reconstruct_many(observations, model)
    assert len({ident for ident, _ in seen}) == 2 and threading.get_ident() not in {ident for ident, _ in seen}
    assert {threads for _, threads in seen} == {1}
    seen.clear()
    attack.reconstruct_many(observations[:1], model)  # fewer clients than threads: one by one, all threads
    assert seen == [(threading.get_ident(), 2)]
    for a, b in zip(one_by_one, side_by_side, strict=True):
        assert b.failure is None and torch.equal(a.images, b.images) and a.loss_trace == b.loss_trace


def test_on_cpu_a_large_models_restarts_run_side_by_side_each_with_its_own_simulator(monkeypatch, torch_threads):
    """One ResNet-18 client with three restarts on 2 threads: the restarts run one per core (two worker threads,
    PyTorch's count 1 in them), each worker builds its own ClientSimulator (functional_call swaps the model's
    parameters, so threads must not share one), and the result equals the restarts one after another."""
    import attacks.gradient_inversion as gi

    model, (obs,) = round_of("resnet18", 1)
    attack = GradientInversion("ggi", recipe("ggi", iterations=2, restarts=3))
    torch_threads(2)
    built, optimized = [], []
    simulator, optimize = GradientInversion._simulator, gi.optimize

    def counted(self, *args):
        built.append(threading.get_ident())
        return simulator(self, *args)

    def watched(*args, **kwargs):
        optimized.append((threading.get_ident(), torch.get_num_threads()))
        return optimize(*args, **kwargs)

    monkeypatch.setattr(GradientInversion, "_simulator", counted)
    monkeypatch.setattr(gi, "optimize", watched)
    side_by_side = attack.reconstruct(obs, model)
    workers = {ident for ident, _ in optimized}
    assert len(optimized) == 3 and len(workers) == 2 and threading.get_ident() not in workers
    assert {threads for _, threads in optimized} == {1}
    assert built[0] == threading.get_ident() and sorted(built[1:]) == sorted(workers)  # one more per worker
    monkeypatch.setattr(gi, "faster_one_per_core", lambda *args: False)
    optimized.clear()
    one_after_another = attack.reconstruct(obs, model)
    assert {ident for ident, _ in optimized} == {threading.get_ident()} and {t for _, t in optimized} == {1}
    assert side_by_side.failure is None and torch.equal(side_by_side.images, one_after_another.images)
    assert side_by_side.loss_trace == one_after_another.loss_trace
