"""BatchNorm statistics recovered from the buffers a train-mode client returns, and their use by the attacks."""

import numpy as np
import pytest
import torch

from attacks import build_attack
from attacks.bn_buffers import BuffersUnavailable, ClientStatsBatchNorm, batchnorm_layers, client_statistics
from attacks.simulate import ClientSimulator
from fl_sim.data.sources import load_dataset
from fl_sim.leakage.single_client import fedsgd_plan, observe
from fl_sim.models import build_model
from fl_sim.scenario import DataConfig, ModelConfig
from fl_sim.training import LocalTraining


@pytest.fixture(scope="module")
def cifar():
    return load_dataset(DataConfig(dataset="cifar10-sample"))


def trained_a_little(model, data):
    """Global running statistics that are not the initial (0, 1): a few train-mode forwards on other images."""
    model.train()
    with torch.no_grad():
        for start in (8, 12):
            x, _ = data.train.batch(np.arange(start, start + 4))
            model(data.normalization.normalize(x))
    return model


def true_batch_statistics(model, x):
    """Each BatchNorm layer's input mean and biased variance on x (what train-mode BatchNorm normalises with)."""
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, i: seen.append(i[0].detach())) for _, m in batchnorm_layers(model)]
    model.train()
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return [(h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False), h.var((0, 2, 3))) for h in seen]


@pytest.mark.parametrize("arch,protocol", [("convnet", "fedsgd"), ("resnet18", "fedsgd"), ("convnet", "fedavg")])
def test_one_step_buffers_give_the_clients_batch_statistics(cifar, arch, protocol):
    model = trained_a_little(build_model(ModelConfig(name=arch), 10, cifar.shape, seed=0), cifar)
    batch = np.arange(4)
    plan = fedsgd_plan(batch_size=4) if protocol == "fedsgd" else LocalTraining(
        "fedavg", 0.05, 4, 1, 0, "sgd", 0.0, 0.0, "train")
    obs, secret = observe(model, cifar.train, [batch], plan, cifar.normalization, 10)
    x, _ = secret.examples(cifar.train)
    truth = true_batch_statistics(model, cifar.normalization.normalize(x))  # the global model's forward
    recovered = client_statistics(model, obs, steps=1)
    assert len(recovered) == len(truth) == len(batchnorm_layers(model))
    for stats, (mean, _, var_unbiased) in zip(recovered, truth, strict=True):
        torch.testing.assert_close(stats.mean, mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(stats.var, var_unbiased, rtol=1e-4, atol=1e-5)
        assert stats.weights.tolist() == [1.0]


def test_replay_with_the_clients_statistics_is_exact_at_its_batch_and_normalises_others_like_it(cifar):
    model = trained_a_little(build_model(ModelConfig(name="convnet"), 10, cifar.shape, seed=0), cifar)
    obs, secret = observe(model, cifar.train, [np.arange(4)], fedsgd_plan(batch_size=4), cifar.normalization, 10)
    x, y = secret.examples(cifar.train)
    z = cifar.normalization.normalize(x)
    stats = client_statistics(model, obs, steps=1)
    sim = ClientSimulator(model, obs, torch.device("cpu"), track_bn=True, client_stats=stats)
    for got, want in zip(sim(z, y), sim.target, strict=True):  # forward and backward are the client's
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(sim.bn_statistics_loss(stats).detach()) < 1e-3
    plain = ClientSimulator(model, obs, torch.device("cpu"), track_bn=True)
    plain(z, y)
    assert float(plain.bn_statistics_loss(stats).detach()) < 1e-3  # the candidates' own statistics are the client's too
    other = cifar.normalization.normalize(cifar.train.batch(np.arange(12, 16))[0])
    first = {}
    layer = next(m for m in sim.model.modules() if isinstance(m, ClientStatsBatchNorm))
    hook = layer.register_forward_hook(lambda _, __, out: first.update(out=out.detach()))
    sim(other * 3 + 1, y)
    hook.remove()
    # another batch is normalised with the client's statistics: its output is not zero-mean / unit-variance
    assert float(first["out"].mean((0, 2, 3)).sub(layer.bias.detach()).abs().max()) > 0.1
    plain(other * 3 + 1, y)
    assert float(plain.bn_statistics_loss(stats).detach()) > 1.0  # and the prior sees that its statistics are not


def test_several_local_steps_mix_the_batches_statistics(cifar):
    model = trained_a_little(build_model(ModelConfig(name="convnet"), 10, cifar.shape, seed=0), cifar)
    plan = LocalTraining("fedavg", 0.05, 2, 3, 0, "sgd", 0.0, 0.0, "train")
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    obs, secret = observe(model, cifar.train, batches, plan, cifar.normalization, 10)
    x, y = secret.examples(cifar.train)
    stats = client_statistics(model, obs, steps=3)
    torch.testing.assert_close(stats[0].weights, torch.tensor([0.81, 0.9, 1.0]) / 2.71)
    sim = ClientSimulator(model, obs, torch.device("cpu"), track_bn=True)
    sim(cifar.normalization.normalize(x), y)  # the true images replayed in the client's order
    assert float(sim.bn_statistics_loss(stats).detach()) < 1e-3
    shuffled = cifar.normalization.normalize(x[[5, 0, 3, 1, 4, 2]])
    sim(shuffled, y[[5, 0, 3, 1, 4, 2]])
    assert float(sim.bn_statistics_loss(stats).detach()) > 1e-2  # the mix depends on which images shared a batch
    rec = build_attack("ggi-bn", {"iterations": 2, "bn_forward": "client"}).reconstruct(obs, model)
    assert rec.failure and "one local step" in rec.failure
    assert build_attack("ggi-bn", {"iterations": 2}).reconstruct(obs, model).failure is None


def test_eval_mode_clients_and_models_without_batchnorm_are_refused_with_a_reason(cifar):
    model = build_model(ModelConfig(name="convnet"), 10, cifar.shape, seed=0)
    obs, _ = observe(model, cifar.train, [np.arange(2)], fedsgd_plan(batch_size=2, batchnorm="eval"),
                     cifar.normalization, 10)
    with pytest.raises(BuffersUnavailable, match="eval mode"):
        client_statistics(model, obs, steps=1)
    lenet = build_model(ModelConfig(name="lenet"), 10, cifar.shape, seed=0)
    obs, _ = observe(lenet, cifar.train, [np.arange(2)], fedsgd_plan(batch_size=2), cifar.normalization, 10)
    assert "no BatchNorm" in build_attack("ggi-bn", {"iterations": 2}).reconstruct(obs, lenet).failure
