"""K gradient-matching problems in one batched optimisation equal the one-by-one attack."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attacks.batched import unbatchable
from attacks.gradient_inversion import GradientInversion
from attacks.recipe import recipe
from fl_sim.data.sources import load_dataset
from fl_sim.models import build_model
from fl_sim.scenario import DataConfig, ModelConfig
from fl_sim.single_client import fedsgd_plan, observe


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
    ("ggi", {}),                                                     # signed Adam, TV, step schedule
    ("ggi", {"signed": False, "restarts": 2}),                       # restarts are problems too
    ("dlg", {"optimizer": "adam", "lr": 0.1}),                       # joint soft labels
    ("afgi", {"edge": 0.0, "early_stop": 1e-3, "patience": 3}),      # per-problem early stop
])
def test_a_batched_round_equals_the_clients_attacked_one_by_one(preset, overrides):
    model, observations = round_of("lenet", 3)
    attack = GradientInversion(preset, recipe(preset, iterations=40, **overrides))
    assert unbatchable(attack.recipe, observations, model) is None
    one_by_one = [attack.reconstruct(o, model) for o in observations]
    batched = attack.reconstruct_many(observations, model)
    for a, b in zip(one_by_one, batched, strict=True):
        assert a.failure is None and b.failure is None
        torch.testing.assert_close(b.images, a.images, rtol=0, atol=1e-3)  # < 1/4 of an 8-bit level
        assert b.iterations == a.iterations and len(b.loss_trace) == len(a.loss_trace)
        np.testing.assert_allclose(b.loss_trace, a.loss_trace, rtol=1e-4, atol=1e-6)
        assert torch.equal(b.labels, a.labels)
    if overrides.get("early_stop"):
        assert {r.iterations for r in one_by_one} != {40}  # early stop did happen, per problem


def test_what_cannot_be_batched_runs_one_by_one_and_says_why():
    model, observations = round_of("lenet", 2)
    assert "L-BFGS" in unbatchable(recipe("dlg"), observations, model)
    assert "edge" in unbatchable(recipe("afgi"), observations, model)
    fedavg = [dataclasses.replace(o, kind="weights") for o in observations]
    assert "FedAvg" in unbatchable(recipe("ggi"), fedavg, model)
    resnet, bn_round = round_of("resnet18", 2)
    assert "BatchNorm" in unbatchable(recipe("ggi"), bn_round, resnet)
    attack = GradientInversion("ggi", recipe("ggi", iterations=2))
    one_by_one = [attack.reconstruct(o, resnet) for o in bn_round]
    for a, b in zip(one_by_one, attack.reconstruct_many(bn_round, resnet), strict=True):
        assert torch.equal(a.images, b.images)
