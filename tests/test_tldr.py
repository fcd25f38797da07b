"""TLDR: loss terms against the paper's formulas, the generator's conditioning, the nearest-neighbour
evaluation against the scoring metrics, and the attack in a run."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
from torch import nn

from attacks import build_attack
from attacks.generator import ConditionedGenerator, balanced_labels, hot_matrix, hot_vectors, soft_vectors
from attacks.inversion_losses import (
    cosine_similarity,
    cross_entropy,
    feature_orthogonality,
    gradient_norm,
    kl_divergence,
    pixel_range,
    variation,
)
from fl_sim.data.sources import load_dataset
from fl_sim.leakage.metrics import avd, ssim
from fl_sim.leakage.nearest import pairwise_avd, pairwise_ssim
from fl_sim.models import build_model
from fl_sim.scenario import DataConfig, ModelConfig
from tests.conftest import tiny

GEN = torch.Generator().manual_seed(0)


@pytest.fixture(scope="module")
def trained_mnist_lenet():
    """A ReLU LeNet trained for two epochs on 2000 random real MNIST digits (mnist5k): (model, normalization)."""
    data = load_dataset(DataConfig(dataset="mnist5k"))
    model = build_model(ModelConfig(name="lenet-relu"), 10, (1, 28, 28), seed=0)
    pick = np.random.default_rng(0).choice(len(data.train), 2000, replace=False)  # mnist5k is sorted by class
    x = data.normalization.normalize(data.train.images(pick))
    y = torch.as_tensor(np.asarray(data.train.labels)[pick])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for i in torch.randperm(2000, generator=torch.Generator().manual_seed(1)).split(32):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()
    return model, data.normalization


def test_kl_divergence_is_the_sum_of_p_log_p_over_q():
    p = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    logits = torch.randn(2, 3, generator=GEN)
    q = torch.softmax(logits, -1)
    by_hand = sum(float(p[b, i] * math.log(p[b, i] / q[b, i])) for b in range(2) for i in range(3) if p[b, i] > 0) / 2
    assert float(kl_divergence(p, logits)) == pytest.approx(by_hand, rel=1e-6)


def test_cross_entropy_is_minus_log_of_the_labels_probability():
    logits, labels = torch.randn(3, 4, generator=GEN), torch.tensor([0, 3, 1])
    q = torch.softmax(logits, -1)
    by_hand = -sum(math.log(q[b, labels[b]]) for b in range(3)) / 3
    assert float(cross_entropy(labels, logits)) == pytest.approx(by_hand, rel=1e-6)


def test_cosine_and_orthogonality_follow_their_formulas():
    f = torch.randn(4, 6, generator=GEN, dtype=torch.float64)
    n = 4
    cos = [[float(f[i] @ f[j] / (f[i].norm() * f[j].norm())) for j in range(n)] for i in range(n)]
    off = sum(cos[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    ortho = sum((cos[i][j] - (i == j)) ** 2 for i in range(n) for j in range(n)) / n**2
    assert float(cosine_similarity(f)) == pytest.approx(off, rel=1e-10)
    assert float(feature_orthogonality(f)) == pytest.approx(ortho, rel=1e-10)
    unit = torch.eye(4, 6, dtype=torch.float64) * 3  # orthogonal features: both terms vanish
    assert float(cosine_similarity(unit)) == 0 and float(feature_orthogonality(unit)) == 0


def test_variation_and_pixel_losses_follow_their_formulas():
    images = torch.randn(2, 3, 4, 5, generator=GEN, dtype=torch.float64)
    x = images.numpy()
    var = sum(((x[i, c, h + 1, w] - x[i, c, h, w]) ** 2 if h + 1 < 4 else 0)
              + ((x[i, c, h, w + 1] - x[i, c, h, w]) ** 2 if w + 1 < 5 else 0)
              for i in range(2) for c in range(3) for h in range(4) for w in range(5)) / 2
    pix = np.maximum(0, -x).sum() + np.maximum(0, x - 1).sum()
    assert float(variation(images)) == pytest.approx(var, rel=1e-10)
    assert float(pixel_range(images)) == pytest.approx(pix, rel=1e-10)
    assert float(pixel_range(torch.rand(2, 1, 3, 3, generator=GEN))) == 0


def test_gradient_norm_is_the_norm_of_the_weight_gradient_and_reaches_the_images():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    images = torch.randn(2, 3, 2, 2, generator=GEN, requires_grad=True)
    labels = torch.tensor([0, 2])
    loss = gradient_norm(model, model(images), labels)
    model.zero_grad()
    nn.functional.cross_entropy(model(images), labels).backward()
    expected = torch.sqrt(sum(p.grad.pow(2).sum() for p in model.parameters()))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    (grad,) = torch.autograd.grad(loss, images)
    assert grad.abs().sum() > 0


def test_conditioning_vectors_and_the_hot_matrix():
    labels = balanced_labels(20, 10, GEN)
    assert torch.bincount(labels, minlength=10).tolist() == [2] * 10
    soft = soft_vectors(labels, 10, GEN)
    assert torch.equal(soft.argmax(-1), labels) and torch.allclose(soft.sum(-1), torch.ones(20))
    assert (soft < 1).all()  # soft, not one-hot
    assert torch.equal(hot_vectors(labels, 10).argmax(-1), labels)
    m = hot_matrix(torch.tensor([2]), 4)[0, 0]
    expected = torch.zeros(4, 4)
    expected[2, :], expected[:, 2] = 1, 1
    assert torch.equal(m, expected)


@pytest.mark.parametrize("classes, shape", [(10, (1, 28, 28)), (10, (3, 32, 32)), (2, (1, 25, 25)),
                                            (40, (3, 32, 32))])
def test_the_generator_makes_images_of_the_models_input_shape(classes, shape):
    gen = ConditionedGenerator(16, classes, shape, width=8)
    labels = balanced_labels(4, classes, GEN)
    out = gen(torch.randn(4, 16), hot_vectors(labels, classes), labels)
    assert out.shape == (4, *shape)


def test_nearest_neighbour_matrices_equal_the_scoring_metrics_on_every_pair():
    a, b = torch.rand(3, 1, 28, 28, generator=GEN), torch.rand(5, 1, 28, 28, generator=GEN)
    b[0] = a[1]  # an exact match
    s, d = pairwise_ssim(a, b, chunk=2), pairwise_avd(a, b)
    for i in range(3):
        np.testing.assert_allclose(s[i].numpy(), ssim(a[i:i + 1].expand(5, -1, -1, -1), b), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(d[i].numpy(), avd(a[i:i + 1].expand(5, -1, -1, -1), b), rtol=1e-6, atol=1e-7)
    assert float(s[1, 0]) == pytest.approx(1.0) and float(d[1, 0]) == pytest.approx(0.0, abs=1e-7)
    colour = torch.rand(2, 3, 32, 32, generator=GEN), torch.rand(3, 3, 32, 32, generator=GEN)
    np.testing.assert_allclose(pairwise_ssim(*colour)[0].numpy(), ssim(colour[0][:1].expand(3, -1, -1, -1),
                                                                       colour[1]), rtol=1e-6)


def test_tldr_is_a_model_attack_with_validated_overrides():
    attack = build_attack("tldr", {"steps": 10})
    assert attack.target == "global-model" and not hasattr(attack, "reconstruct")
    assert build_attack("tldr-inversion", {}).recipe.mode == "inversion"
    with pytest.raises(ValueError, match="stepz"):
        build_attack("tldr", {"stepz": 10})


def test_the_generator_honours_its_conditioning_on_a_trained_classifier(trained_mnist_lenet):
    """After a short training the classifier predicts the conditioned label for most generated images."""
    model, norm = trained_mnist_lenet
    small = {"batch": 40, "width": 32, "lr": 3e-3, "samples_per_class": 4}
    untrained = build_attack("tldr", small | {"steps": 1}).invert(model, norm, 10, (1, 28, 28))
    assert float((untrained.predicted == untrained.labels).double().mean()) < 0.5
    inv = build_attack("tldr", small | {"steps": 100}).invert(model, norm, 10, (1, 28, 28))
    assert inv.failure is None and inv.images.shape == (40, 1, 28, 28)
    assert float(inv.images.min()) >= 0 and float(inv.images.max()) <= 1
    assert torch.equal(inv.labels, torch.arange(10).repeat_interleave(4))
    assert float((inv.predicted == inv.labels).double().mean()) >= 0.8
    assert float(inv.confidence.mean()) > 0.5
    assert inv.loss_trace[-1] < inv.loss_trace[0]


def test_a_run_with_tldr_writes_its_table_images_and_grid(tmp_path, write_scenario, cli):
    raw = tiny(federation={"num_clients": 2, "clients_per_round": 2, "rounds": 2},
               training={"protocol": "fedavg", "batch_size": 32, "local_steps": 5, "lr": 0.05},
               model={"name": "lenet-relu"}, threat_model={"rounds": [2]},
               attacks=[{"name": "tldr", "steps": 3, "batch": 20, "samples_per_class": 2}])
    code, _, err = cli("run", write_scenario(raw), "--out", tmp_path / "run")
    assert code == 0, err
    root = tmp_path / "run"
    rows = list(csv.DictReader(open(root / "inversion.csv")))
    assert {r["round"] for r in rows} == {"2"} and {r["attack"] for r in rows} == {"tldr"}
    assert {r["class"] for r in rows} == {*map(str, range(10)), "all"}
    metrics = {r["metric"] for r in rows}
    assert {"nn_train_ssim", "nn_test_ssim", "ssim_gap", "nn_train_avd", "nn_test_avd", "avd_gap", "confidence",
            "train_closer", "failed"} <= metrics
    assert (root / "inversions" / "round-0002" / "tldr.safetensors").exists()
    assert (root / "grids" / "inversion-round-0002-tldr.png").exists()
    assert "Network inversion" in (root / "report.html").read_text()
    assert not [r for r in csv.DictReader(open(root / "results.csv")) if r["attack"] == "tldr"]
    code, out, err = cli("attack", root, "--attack", "tldr-inversion", "--set", "steps=2", "--set", "batch=10",
                         "--set", "samples_per_class=1")  # afterwards, on the saved final global model
    assert code == 0, err
    again = list(csv.DictReader(open(root / "inversion.csv")))
    assert {r["attack"] for r in again} == {"tldr", "tldr-inversion"} and "inversion.csv" in out
