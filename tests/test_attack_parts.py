"""Building blocks of gradient matching: regularisers, distances, label recovery, client replay."""

import numpy as np
import pytest
import torch

from attacks import build_attack
from attacks.edges import EdgePrior, baseline_point
from attacks.labels import LABEL_STRATEGIES, LabelParams, LabelRecoveryError, LabelSignal, lrb_head
from attacks.matching import GradientDistance
from attacks.optimize import Trial, optimize, step_schedule
from attacks.recipe import PRESETS, budgeted, recipe
from attacks.regularizers import (
    batch_orthogonality,
    channel_mean_prior,
    l2_norm,
    sixth_power,
    total_variation,
    total_variation_input,
)
from attacks.simulate import ClientSimulator, UnsupportedObservation
from fl_sim.data.sources import load_dataset
from fl_sim.leakage.single_client import fedsgd_plan, observe
from fl_sim.models import build_model
from fl_sim.observation import Normalization
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


def test_input_space_tv_equals_breachings_total_variation():
    """Golden value: breaching 0.1.2's TotalVariation(scale=1.0) on this tensor (its conv form, zero padding,
    eps 1e-8), computed in an environment with breaching installed."""
    z = torch.linspace(-2, 2, 2 * 3 * 5 * 4).reshape(2, 3, 5, 4).sin() * 1.7
    assert float(total_variation_input(z)) == pytest.approx(0.6600404977798462, rel=1e-6)


def test_ggi_step_schedule_is_breachings_step_lr():
    """breaching / inversefed: MultiStepLR(milestones=[n // 2.667, n // 1.6, n // 1.142], gamma=0.1); the values
    are what breaching 0.1.2's optimizer_lookup builds (float floor division: 24000 // 1.6 = 14999)."""
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=0.1)
    assert sorted(step_schedule(opt, recipe("ggi")).milestones) == [8998, 14999, 21015]
    assert sorted(step_schedule(opt, recipe("ggi", iterations=200)).milestones) == [74, 124, 175]


def test_the_iterate_with_the_lowest_objective_is_kept():
    """Signed Adam at a constant, too large step oscillates around the minimum: the kept candidate is
    the best iterate seen, not the last one."""
    def objective(z, _):
        value = (z - 0.3).pow(2).sum()
        return value, value

    r = recipe("ggi", iterations=25, schedule="none", lr=0.7, clip=False, tv=0.0)
    trial = optimize(objective, torch.zeros(1, 1, 1, 1), None, r, (torch.zeros(1), torch.ones(1)))
    assert trial.failure is None
    assert trial.loss == pytest.approx(min(trial.trace + [trial.loss]))
    assert trial.loss < trial.trace[-1]


def test_strong_wolfe_l_bfgs_never_steps_uphill(mnist):
    """The dlg / idlg presets' line search: every accepted step lowers the objective (the fixed-step L-BFGS
    of the DLG code can jump into the sigmoids' flat region and stay there)."""
    model = build_model(ModelConfig(name="lenet"), 10, mnist.shape, seed=3)
    obs, _ = observe(model, mnist.train, [np.array([0])], fedsgd_plan(), mnist.normalization, 10)
    rec = build_attack("idlg", {"iterations": 15}).reconstruct(obs, model)
    assert rec.failure is None
    assert all(b <= a + 1e-12 for a, b in zip(rec.loss_trace, rec.loss_trace[1:], strict=False)), rec.loss_trace


def test_restarts_are_chosen_by_the_gradient_distance_not_the_priors():
    attack = build_attack("ggi", {"iterations": 1})
    obs = type("Obs", (), {"normalization": Normalization.identity(1)})()
    low_total = Trial(torch.zeros(1, 1, 2, 2), None, loss=0.1, score=0.09)
    low_distance = Trial(torch.ones(1, 1, 2, 2), None, loss=0.5, score=0.01)
    rec = attack._result([low_total, low_distance], torch.tensor([0]), obs, 0.0)
    assert torch.equal(rec.images, torch.ones(1, 1, 2, 2))


def test_afgi_fine_tunes_batches_of_more_than_one_image():
    """AFGI §V-A: 10K iterations at batch 1, 10K more of fine-tuning when the batch is larger."""
    assert budgeted(recipe("afgi"), 1).iterations == 10_000
    assert budgeted(recipe("afgi"), 4).iterations == 20_000
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    model = build_model(ModelConfig(name="lenet"), 10, (3, 32, 32), seed=0)
    attack = build_attack("afgi", {"iterations": 3, "fine_tune": 2, "labels": "idlg", "edge": 0.0})
    for batch, expected in (([0], 3), ([0, 1], 5)):
        obs, _ = observe(model, data.train, [np.array(batch)], fedsgd_plan(batch_size=len(batch)),
                         data.normalization, 10)
        assert attack.reconstruct(obs, model).iterations == expected


@pytest.mark.parametrize("term", [total_variation, total_variation_input, channel_mean_prior((0.5, 0.4, 0.3)),
                                  sixth_power, l2_norm, batch_orthogonality])
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


@pytest.mark.parametrize("threads", [1, 2])
def test_label_table_bias_count_recovers_repeated_labels_the_distinct_rules_cannot(threads, mnist):
    """idlg and yin return distinct labels (up to the number of classes), so neither can pass the distinct-label
    bound; lrb's fill step repeats labels; the bias-gradient count recovers the multiplicities themselves
    (untrained ResNet-18, B = 8, 16)."""
    from benchmarks.label_recovery import label_table

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        table = label_table("resnet18", batch_sizes=(8, 16), trials=8, data=mnist)
    finally:
        torch.set_num_threads(before)
    for k in (8, 16):
        row = table[k]
        assert row["bias-count"]["count"] >= 0.95 and row["bias-count"]["existence"] >= 0.95, table
        assert row["bias-count"]["count"] > row["lrb"]["count"], table
        assert row["bias-count"]["count"] > max(row["yin"]["count"], row["idlg"]["count"]), table
    # up to as many labels as classes, idlg and yin return distinct labels: never past the distinct-label bound
    assert max(table[8]["yin"]["count"], table[8]["idlg"]["count"]) <= table[8]["distinct_bound"] + 1e-9 < 1.0, table


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg", "fedavg-epochs"])
def test_bias_count_returns_a_known_batchs_label_multiset(mnist, protocol):
    from fl_sim.data.images import TensorImageSet

    labels = [0, 1, 1, 1, 1, 3, 3, 3, 7, 7]
    idx = np.concatenate([np.flatnonzero(mnist.train.labels == c)[: labels.count(c)] for c in sorted(set(labels))])
    pool = TensorImageSet(mnist.train.pixels[idx], mnist.train.labels[idx])
    model = build_model(ModelConfig(name="convnet"), 10, mnist.shape, seed=0)
    order = np.random.default_rng(0).permutation(10)
    if protocol == "fedsgd":
        plan, batches = fedsgd_plan(batch_size=10), [order]
    elif protocol == "fedavg":  # two local steps of 5 (p̄ is probed along the path; at lr 0.05 it drifts too far)
        plan, batches = LocalTraining("fedavg", 0.01, 5, 2, 0, "sgd", 0.0, 0.0, "train"), [order[:5], order[5:]]
    else:  # two epochs of two steps: every image seen twice
        plan = LocalTraining("fedavg", 0.01, 5, 4, 2, "sgd", 0.0, 0.0, "train")
        batches = [order[:5], order[5:], order[::2], order[1::2]]
    obs, _ = observe(model, pool, batches, plan, mnist.normalization, 10)
    rec = build_attack("ggi", {"labels": "bias-count", "iterations": 1}).reconstruct(obs, model)
    assert sorted(rec.labels.tolist()) == labels


def _repeated_label_resnet(mnist, labels: list[int]):
    """A ResNet-18 FedSGD observation of a real batch with the given labels, and its simulator."""
    from fl_sim.data.images import TensorImageSet

    idx = np.concatenate([np.flatnonzero(mnist.train.labels == c)[: labels.count(c)] for c in sorted(set(labels))])
    pool = TensorImageSet(mnist.train.pixels[idx], mnist.train.labels[idx])
    model = build_model(ModelConfig(name="resnet18"), 10, mnist.shape, seed=0)
    batch = np.arange(len(idx))
    obs, secret = observe(model, pool, [batch], fedsgd_plan(batch_size=len(idx)), mnist.normalization, 10)
    return model, pool, obs, secret


def test_lrb_leaves_the_model_exactly_as_it_found_it(mnist):
    """The duplicate step runs the last block in eval mode; on copies, so the simulator's BatchNorm keeps
    replaying the client's batch statistics and the true batch still matches the update exactly."""
    model, pool, obs, secret = _repeated_label_resnet(mnist, [1, 1, 1, 5])
    sim = ClientSimulator(model, obs, torch.device("cpu"))
    x, y = secret.examples(pool)
    distance = GradientDistance(sim.target, "cosine", "uniform")
    at_truth = float(distance(sim(mnist.normalization.normalize(x), y)).detach())
    before_state = {k: v.clone() for k, v in sim.model.state_dict().items()}
    before_modes = [m.training for m in sim.model.modules()]
    labels = LABEL_STRATEGIES.get("lrb")(LabelSignal(sim.label_signal_grad("fc"), 4, sim.model), LabelParams())
    assert len(labels) == 4
    assert [m.training for m in sim.model.modules()] == before_modes
    assert all(torch.equal(v, before_state[k]) for k, v in sim.model.state_dict().items())
    after = float(distance(sim(mnist.normalization.normalize(x), y)).detach())
    # the replay's GEMM convolutions round differently from the client's kernels, and on MNIST's flat background a
    # few ReLU gates sit at 0 after train-mode BatchNorm: 2e-5 apart at the truth here (a float64 replay: 0)
    assert after == at_truth and at_truth < 1e-4, (at_truth, after)


def test_lrb_network_input_vanishes_for_softmax_cross_entropy(mnist):
    """G₁ (the column sums of ∂L/∂W_fc) is Σ_i h_i Σ_c (p_ic − y_ic) = 0: LRB's network step sees only
    float noise, so its accuracy comes from the negative row minima and the fill step (README)."""
    _, _, obs, _ = _repeated_label_resnet(mnist, [1, 1, 1, 5])
    grad = obs.update["fc.weight"]
    g1 = grad.sum(dim=0)
    assert float(g1.abs().max()) < 1e-5 * float(grad.abs().max()), (float(g1.abs().max()), float(grad.abs().max()))


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
    trial = optimize(lambda z, _: ((z * float("nan")).sum(),) * 2, z0, None, recipe("ggi", iterations=5),
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
