"""FedAvg over several local epochs: the per-epoch replay and Dimitrov et al.'s order-invariant epoch prior."""

import numpy as np
import pytest
import torch

from attacks import build_attack
from attacks.epochs import EpochTie
from attacks.simulate import ClientSimulator
from fl_sim.data.partition import round_batches
from fl_sim.data.sources import load_dataset
from fl_sim.leakage.single_client import observe
from fl_sim.models import build_model
from fl_sim.scenario import DataConfig, ModelConfig
from fl_sim.training import LocalTraining


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DataConfig(dataset="mnist5k"))


def epochs_observation(mnist, model_name="convnet", n=10, b=4, epochs=2):
    shard = np.arange(100, 100 + n)
    model = build_model(ModelConfig(name=model_name), 10, mnist.shape, seed=0)
    plan = LocalTraining("fedavg", 0.05, b, 1, epochs, "sgd", 0.0, 0.0, "train")
    batches = round_batches(shard, seed=0, client=0, server_round=1, batch_size=b, local_epochs=epochs)
    obs, secret = observe(model, mnist.train, batches, plan, mnist.normalization, 10)
    return model, obs, secret, batches


def test_separate_epochs_replay_the_clients_shuffled_epochs_exactly(mnist):
    """Epoch e's copy holds the images in that epoch's (shuffled) order: the replay is the client's update,
    its last batch of each epoch smaller (10 images in batches of 4)."""
    model, obs, secret, batches = epochs_observation(mnist)
    assert obs.meta.local_epochs == 2 and obs.meta.local_steps == 6 and [len(b) for b in batches] == [4, 4, 2] * 2
    sim = ClientSimulator(model, obs, torch.device("cpu"), separate_epochs=True)
    assert (sim.copies, sim.num_images, sim.num_candidates) == (2, 10, 20)
    x, y = mnist.train.batch(np.concatenate(batches))  # epoch 0's order, then epoch 1's
    for got, want in zip(sim(mnist.normalization.normalize(x), y), sim.target, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    shared = ClientSimulator(model, obs, torch.device("cpu"))
    assert (shared.copies, shared.num_candidates) == (1, 10) and [len(i) for i in shared.schedule] == [4, 4, 2] * 2


def test_epoch_prior_ignores_the_order_of_each_epochs_candidates():
    gen = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 1, 2, 2, 2])
    images = torch.randn(6, 1, 5, 5, generator=gen)
    noisy = torch.cat([images, images + 0.1 * torch.randn(6, 1, 5, 5, generator=gen)])
    tie = EpochTie(2, 6, labels, every=1)
    value = float(tie(noisy))
    perm = torch.tensor([1, 0, 2, 5, 3, 4])  # a reordering within labels
    assert float(tie(torch.cat([noisy[:6], noisy[6:][perm]]))) == pytest.approx(value, rel=1e-6)
    assert float(tie(torch.cat([images, images[perm]]))) == pytest.approx(0.0, abs=1e-12)
    torch.testing.assert_close(tie.merged(torch.cat([images, images[perm]])), images)
    across = torch.tensor([2, 0, 1, 5, 3, 4])  # slot 0 ↔ slot 2 swap labels: the prior may not pair them
    tie(torch.cat([images, images[across]]))
    assert float(tie(torch.cat([images, images[across]]))) > 0


def test_dimitrov_preset_reconstructs_the_clients_n_images_with_counted_labels(mnist):
    model, obs, secret, _ = epochs_observation(mnist, model_name="lenet-relu", n=8, b=4)
    rec = build_attack("dimitrov", {"iterations": 20}).reconstruct(obs, model)
    truth, labels = secret.examples(mnist.train)
    assert rec.failure is None and rec.images.shape == truth.shape == (8, 1, 28, 28)
    assert sorted(rec.labels.tolist()) == sorted(labels.tolist())
