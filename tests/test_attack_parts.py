"""Building blocks of gradient matching: regularisers, distances, label recovery, client replay."""

import numpy as np
import pytest
import torch

from attacks import build_attack
from attacks.edges import EdgePrior, baseline_point
from attacks.labels import LABEL_STRATEGIES, LabelParams, LabelRecoveryError, LabelSignal, lrb_head
from attacks.matching import GradientDistance
from attacks.optimize import optimize
from attacks.recipe import PRESETS, recipe
from attacks.regularizers import batch_orthogonality, channel_mean_prior, l2_norm, sixth_power, total_variation
from attacks.simulate import ClientSimulator, UnsupportedObservation
from fl_sim.data.sources import load_dataset
from fl_sim.leakage.single_client import fedsgd_plan, observe
from fl_sim.models import build_model
from fl_sim.scenario import DataConfig, ModelConfig
from fl_sim.training import LocalTraining


@pytest.fixture(scope="module")
def mnist():
    return load_dataset(DataConfig(dataset="mnist5k"))


def test_regularizers_match_their_formulas():
    x = torch.arange(2 * 3 * 2 * 3, dtype=torch.float64).reshape(2, 3, 2, 3) / 36
    dx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean()
    dy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
    assert total_variation(x) == pytest.approx(float(dx + dy))
    prior = (0.491, 0.467, 0.421)
    expected = np.mean([np.linalg.norm(x[b].mean(dim=(1, 2)).numpy() - prior) for b in range(2)])
    assert channel_mean_prior(prior)(x) == pytest.approx(expected)
    assert sixth_power(x) == pytest.approx(float((x**6).sum() / 2))
    assert l2_norm(x) == pytest.approx(float(np.mean([x[b].norm() for b in range(2)])))
    a, b = x[0].flatten(), x[1].flatten()
    assert batch_orthogonality(x) == pytest.approx(float((a @ b / a.norm() / b.norm()) ** 2))
    assert float(batch_orthogonality(x[:1])) == 0.0


@pytest.mark.parametrize("term", [total_variation, channel_mean_prior((0.5, 0.4, 0.3)), sixth_power, l2_norm,
                                  batch_orthogonality])
def test_regularizers_pass_gradcheck(term):
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(term, (x,), eps=1e-6, atol=1e-4)


def test_edge_prior_value_is_the_canny_midpoint_distance_and_has_a_gradient():
    import cv2

    x = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    x[..., 4:12, 6:14] = 1.0  # a bright square
    base = torch.tensor([2.0, 3.0], dtype=torch.float64)
    prior = EdgePrior(base, 0.8, 0.9)
    edges = np.argwhere(cv2.Canny((x[0, 0].numpy() * 255).astype(np.uint8), 204, 229.5) > 0)
    expected = np.linalg.norm(edges[len(edges) // 2] - base.numpy())
    x.requires_grad_(True)
    value = prior(x)
    assert float(value.detach()) == pytest.approx(expected)
    value.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_edge_baseline_maps_the_strongest_cells_to_pixels():
    grad = torch.zeros(10, 16)  # h = 16 features → a 4 × 4 grid
    grad[:, 5] = 1.0  # cell (1, 1) only
    assert baseline_point(grad, 32, 32, beta=0.6).tolist() == [8.0, 8.0]


def test_cosine_and_l2_distances():
    t = [torch.tensor([1.0, 0.0]), torch.tensor([[0.0, 2.0]])]
    assert float(GradientDistance(t, "cosine", "uniform")([x * 3 for x in t])) == pytest.approx(0.0, abs=1e-7)
    assert float(GradientDistance(t, "cosine", "uniform")([-x for x in t])) == pytest.approx(2.0)
    assert float(GradientDistance(t, "l2", "uniform")([x * 2 for x in t])) == pytest.approx(5.0)
    assert GradientDistance(t, "l2", "linear").weights == [1.0, 0.5]


def test_idlg_labels_are_exact_at_batch_1_on_fifty_real_images():
    """iDLG's rule on the DLG LeNet: 100 % over 30 MNIST + 20 CIFAR-10 real images."""
    correct, seen = 0, 0
    for name, count, shape in [("mnist5k", 30, (1, 28, 28)), ("cifar10-sample", 20, (3, 32, 32))]:
        data = load_dataset(DataConfig(dataset=name, test_fraction=0.05))
        pool = _union(data)  # train + test: every real image of the set
        for i in range(count):
            seen += 1
            model = build_model(ModelConfig(name="lenet"), data.num_classes, shape, seed=int(i))
            obs, _ = observe(model, pool, [np.array([i])], fedsgd_plan(), data.normalization, data.num_classes)
            model.load_state_dict(obs.global_state)
            label = LABEL_STRATEGIES.get("idlg")(LabelSignal(obs.update["fc.0.weight"], 1, model), LabelParams())
            correct += int(label.item() == pool.labels[i])
    assert (correct, seen) == (50, 50)


def _union(data):
    from fl_sim.data.images import TensorImageSet

    return TensorImageSet(torch.cat([data.train.pixels, data.test.pixels]),
                          np.concatenate([data.train.labels, data.test.labels]))


def test_label_recovery_table_lrb_beats_yin_beats_idlg_where_labels_repeat():
    from benchmarks.label_recovery import label_table

    table = label_table(batch_sizes=(4, 8), trials=20, train_steps=100)
    for k in (4, 8):
        assert table[k]["lrb"] > table[k]["yin"] > table[k]["idlg"], table


def test_lrb_needs_a_residual_model(mnist):
    model = build_model(ModelConfig(name="lenet"), 10, mnist.shape, seed=0)
    with pytest.raises(LabelRecoveryError, match="resnet18"):
        lrb_head(model)


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 5e-4)])
def test_fedavg_replay_with_the_true_data_reproduces_the_observed_update(mnist, momentum, weight_decay):
    """The unrolled local steps are the client's computation, not Δθ / lr passed off as a gradient."""
    model = build_model(ModelConfig(name="convnet"), 10, mnist.shape, seed=0)
    plan = LocalTraining("fedavg", 0.05, 2, 3, 0, "sgd", momentum, weight_decay, "train")
    batches = [np.array([0, 1]), np.array([2, 3]), np.array([4, 5])]
    obs, secret = observe(model, mnist.train, batches, plan, mnist.normalization, 10)
    sim = ClientSimulator(model, obs, torch.device("cpu"))
    x, y = secret.examples(mnist.train)
    replay = sim(mnist.normalization.normalize(x), y)
    for got, want in zip(replay, sim.target, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert sim.num_images == 6 and sim.steps == 3


def test_adam_fedavg_is_refused_with_a_reason(mnist):
    model = build_model(ModelConfig(name="lenet"), 10, mnist.shape, seed=0)
    plan = LocalTraining("fedavg", 0.01, 2, 2, 0, "adam", 0.0, 0.0, "train")
    obs, _ = observe(model, mnist.train, [np.array([0, 1]), np.array([2, 3])], plan, mnist.normalization, 10)
    with pytest.raises(UnsupportedObservation, match="adam"):
        ClientSimulator(model, obs, torch.device("cpu"))
    rec = build_attack("ggi", {"iterations": 2}).reconstruct(obs, model)
    assert rec.failure and "adam" in rec.failure


def test_diverging_optimisation_is_a_failure_not_a_crash():
    z0 = torch.zeros(1, 1, 4, 4)
    trial = optimize(lambda z, _: (z * float("nan")).sum(), z0, None, recipe("ggi", iterations=5),
                     (torch.zeros(1), torch.ones(1)))
    assert trial.failure is not None and "nan" in trial.failure


def test_every_preset_value_can_be_overridden_and_is_checked():
    assert recipe("afgi", iterations=7, tv=0.5).iterations == 7
    for name in PRESETS:
        build_attack(name, {"iterations": 3})
    with pytest.raises(Exception, match="iterationz"):
        build_attack("ggi", {"iterationz": 3})
    assert recipe("raf-gi") == recipe("afgi")  # the same method under its earlier name


def test_bn_statistics_prior_is_near_zero_at_matching_statistics(mnist):
    """Not exactly zero: GradInversion compares the biased batch variance with PyTorch's unbiased running
    variance, an n/(n−1) residue that matters only on small deep layers."""
    model = build_model(ModelConfig(name="convnet"), 10, mnist.shape, seed=0)
    x, y = mnist.train.batch(np.arange(8))
    z = mnist.normalization.normalize(x)
    for m in model.modules():  # running statistics := this batch's statistics
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = 1.0
    model.train()
    model(z)
    obs, _ = observe(model, mnist.train, [np.arange(8)], fedsgd_plan(batch_size=8), mnist.normalization, 10)
    sim = ClientSimulator(model, obs, torch.device("cpu"), track_bn=True)
    sim(z, y)
    at_truth = float(sim.bn_statistics_loss())
    sim(torch.randn_like(z), y)
    assert 20 * at_truth < float(sim.bn_statistics_loss())
