"""Each defense changes what the curious server observes in its stated way; settings are validated at load;
DLG leakage falls as the noise or the pruning ratio rises; the comparison report builds."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from defenses import DEFENSES, DefenseContext, Releases, build_defense, defend, defense_label
from fl_sim.federation.setup import prepare
from fl_sim.leakage.secret import SecretLedger
from fl_sim.scenario import ComponentSpec, expand_grid, scenario_from_dict
from fl_sim.store import RunStore
from fl_sim.training import LocalTraining
from tests.conftest import ROOT, run_inprocess, tiny


def observed(tmp_path, defenses, name="run", **sections):
    """The parameter part of every Observation of a tiny FedSGD federation with ``defenses``."""
    raw = tiny(defenses=defenses, **sections)
    store, seen = run_inprocess(tmp_path, raw, name)
    params = {n for n, _ in prepare(scenario_from_dict(raw)).model().named_parameters()}
    return seen, params


def test_prune_zeroes_at_least_the_ratio_of_every_tensor(tmp_path):
    seen, params = observed(tmp_path, [{"name": "prune", "ratio": 0.9}])
    for obs in seen:
        for name in params:
            v = obs.update[name]
            assert (v == 0).float().mean() >= math.floor(0.9 * v.numel()) / v.numel()


def test_quantized_values_lie_on_the_grid(tmp_path):
    seen, params = observed(tmp_path, [{"name": "quantize", "bits": 3}])
    for obs in seen:
        for name in params:
            v = obs.update[name].double()
            assert len(torch.unique(v)) <= 2**3
            step = (v.max() - v.min()) / (2**3 - 1)
            k = (v - v.min()) / step
            assert torch.allclose(k, k.round(), atol=1e-4)


def test_prune_drops_exactly_the_smallest_magnitudes():
    gen = torch.Generator().manual_seed(0)
    values = (torch.randperm(200, generator=gen).double() + 1) * torch.where(torch.rand(200, generator=gen) < 0.5,
                                                                               -1.0, 1.0)
    out = build_defense("prune", {"ratio": 0.7}).apply({"w": values.view(20, 10)}, None)["w"].flatten()
    kept = set(torch.nonzero(out).flatten().tolist())
    assert kept == set(values.abs().argsort(descending=True)[:60].tolist())  # the 60 largest |x|, exactly
    assert torch.equal(out[sorted(kept)], values[sorted(kept)])


def test_quantization_sends_the_nearest_level_of_the_grid():
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(5000, generator=gen).double()
    out = build_defense("quantize", {"bits": 3}).apply({"w": v}, None)["w"]
    levels = v.min() + torch.arange(8, dtype=torch.float64) * (v.max() - v.min()) / 7  # the 3-bit grid
    nearest = levels[(v[:, None] - levels[None]).abs().argmin(1)]
    torch.testing.assert_close(out, nearest, rtol=0, atol=1e-12)


def test_sign_quantization_sends_one_magnitude_per_tensor():
    update = {"w": torch.randn(50, 3)}
    out = build_defense("quantize", {"mode": "sign"}).apply(update, None)
    assert torch.allclose(out["w"].abs(), update["w"].abs().mean().expand(50, 3))
    assert torch.equal(torch.sign(out["w"]), torch.sign(update["w"]))


def test_dp_clips_the_update_to_norm_c_before_its_noise(tmp_path):
    seen, params = observed(tmp_path, [{"name": "dp", "clip": 0.01, "sigma": 0.0}])
    for obs in seen:
        norm = math.sqrt(sum(float(obs.update[n].double().pow(2).sum()) for n in params))
        assert norm <= 0.01 * (1 + 1e-5)
    unclipped, _ = observed(tmp_path, [], "plain")
    ratio = seen[0].update["fc.0.weight"] / unclipped[0].update["fc.0.weight"]
    assert torch.allclose(ratio[torch.isfinite(ratio)], ratio[torch.isfinite(ratio)].flatten()[0])  # a scaling


def test_dp_noise_has_standard_deviation_sigma_c_and_is_reproducible():
    dp = build_defense("dp", {"clip": 2.0, "sigma": 0.05})
    ctx = lambda: DefenseContext(None, None, None, torch.Generator().manual_seed(7), "fedsgd")  # noqa: E731
    out = dp.apply({"w": torch.zeros(400_000)}, ctx())
    assert out["w"].std().item() == pytest.approx(0.1, rel=0.01)
    assert torch.equal(out["w"], dp.apply({"w": torch.zeros(400_000)}, ctx())["w"])


@pytest.mark.parametrize("name", ["dp", "dp-sgd"])
def test_epsilon_falls_as_noise_rises_and_grows_with_participations(name):
    when = Releases(participations=10, steps_per_round=2, batch_rate=0.05)
    eps = [build_defense(name, {"sigma": s}).budget(when).epsilon for s in (0.0, 0.5, 1.0, 4.0)]
    assert eps[0] == math.inf and eps[1] > eps[2] > eps[3] > 0
    more = Releases(participations=40, steps_per_round=2, batch_rate=0.05)
    assert build_defense(name, {"sigma": 1.0}).budget(more).epsilon > eps[2]
    assert build_defense(name, {"sigma": 1.0}).budget(Releases(0, 2, 0.05)).epsilon == 0  # never took part


def opacus_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus's RDP accountant driven the way its users drive it: one step() per release."""
    import warnings

    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accountant.get_epsilon(delta)


def test_dp_budget_is_the_servers_no_amplification_sensitivity_2c_guarantee():
    dp = build_defense("dp", {"clip": 1.0, "sigma": 2.0, "delta": 1e-5})
    for rounds in (1, 3, 10):
        budget = dp.budget(Releases(rounds, 1, 0.1))
        assert budget.epsilon == pytest.approx(opacus_epsilon(1.0, 1.0, rounds, 1e-5), rel=1e-9)  # σ/2, rate 1
        assert budget.level == "client" and "2C" in budget.adjacency
    local = build_defense("local-dp", {"epsilon": 2.0, "delta": 1e-6})
    assert (local.budget(Releases(3, 2, 0.1)).epsilon, local.budget(Releases(3, 2, 0.1)).delta) == (6.0, 3e-6)
    dp_sgd = build_defense("dp-sgd", {"sigma": 1.0, "delta": 1e-5})
    assert dp_sgd.budget(Releases(3, 4, 0.05)).epsilon == pytest.approx(opacus_epsilon(1.0, 0.05, 12, 1e-5), rel=1e-9)
    assert dp_sgd.budget(Releases(3, 4, 0.05)).level == "example"


def test_privacy_csv_gives_each_client_the_budget_of_the_rounds_it_took_part_in(tmp_path):
    raw = tiny(federation={"num_clients": 5, "clients_per_round": 2, "rounds": 10}, threat_model={"rounds": [1]},
               defenses=[{"name": "dp", "clip": 1.0, "sigma": 1.0}])
    store, _ = run_inprocess(tmp_path, raw)
    privacy = pd.read_csv(store.layout.privacy)
    assert list(privacy.columns) == ["client", "defense", "participations", "epsilon", "delta", "level", "adjacency",
                                     "adversary", "accountant", "steps_per_round", "batch_rate"]
    assert (privacy["steps_per_round"] == 1).all() and (privacy["batch_rate"] < 1).all()  # FedSGD, batch 2 of a shard
    metrics = pd.read_csv(store.layout.metrics)
    taken = {c: sum(str(c) in row.split() for row in metrics["clients"]) for c in range(5)}
    assert dict(zip(privacy["client"], privacy["participations"], strict=True)) == taken
    assert sum(taken.values()) == 20 and len(set(taken.values())) > 1 and 3 in taken.values()
    for row in privacy.itertuples():
        assert row.epsilon == pytest.approx(opacus_epsilon(0.5, 1.0, row.participations, 1e-5), rel=1e-9)
    three = privacy[privacy.participations == 3]  # a client in 3 of 10 rounds: the 3-round budget, not 10
    assert (three["epsilon"] == three["epsilon"].iloc[0]).all()
    assert three["epsilon"].iloc[0] < privacy["epsilon"].max()
    from fl_sim.report import build_report

    html = build_report([store.root]).read_text()
    assert "Privacy budget against the curious server" in html and "worst case ε" in html


def test_dp_sgd_samples_its_batches_poisson_and_reports_their_expected_size(tmp_path):
    from fl_sim.data.partition import poisson_batches

    shard = np.arange(100, 300)
    draws = [poisson_batches(shard, seed=0, client=1, server_round=r, batch_size=10, steps=1)[0] for r in range(2000)]
    sizes = np.array([len(b) for b in draws])
    assert sizes.mean() == pytest.approx(10, rel=0.03) and sizes.var() == pytest.approx(200 * 0.05 * 0.95, rel=0.1)
    inclusion = np.bincount(np.concatenate(draws) - 100, minlength=200) / len(draws)
    assert np.abs(inclusion - 0.05).max() < 0.025  # every example joins with rate q, independently of its index
    both = [set(a) & set(b) for a, b in zip(draws[::2], draws[1::2], strict=True)]
    assert np.mean([len(x) for x in both]) == pytest.approx(200 * 0.05**2, rel=0.25)  # independent across draws
    raw = tiny(federation={"num_clients": 3, "clients_per_round": 3, "rounds": 3}, training={"batch_size": 4},
               defenses=[{"name": "dp-sgd", "sigma": 1.0}])
    store, seen = run_inprocess(tmp_path, raw)
    ledger = SecretLedger(store.layout)
    used = {len(ledger.get(o.server_round, o.client).batches[0]) for o in seen}
    assert len(used) > 1  # Poisson: the realised sizes vary ...
    assert {o.meta.batch_size for o in seen} == {4}  # ... and the server is told the expected one
    assert (pd.read_csv(store.layout.privacy)["level"] == "example").all()


def test_fedavg_defenses_act_on_the_weight_change(tmp_path):
    seen, params = observed(tmp_path, [{"name": "prune", "ratio": 0.8}],
                            training={"protocol": "fedavg", "local_steps": 2, "batch_size": 2, "lr": 0.1})
    for obs in seen:
        for name in params:
            change = obs.update[name] - obs.global_state[name]
            assert (change == 0).float().mean() >= math.floor(0.8 * change.numel()) / change.numel()


def test_soteria_masks_only_the_representation_layer_gradient(tmp_path):
    seen, params = observed(tmp_path, [{"name": "soteria", "ratio": 0.6}], federation={"rounds": 1})
    plain, _ = observed(tmp_path, [], "plain", federation={"rounds": 1})
    for defended, clean in zip(seen, plain, strict=True):
        for name in params - {"fc.0.weight"}:
            assert torch.equal(defended.update[name], clean.update[name])
        zero_columns = (defended.update["fc.0.weight"] == 0).all(0)
        assert zero_columns.float().mean() >= 0.59
        kept = ~zero_columns
        assert torch.equal(defended.update["fc.0.weight"][:, kept], clean.update["fc.0.weight"][:, kept])


class TinyReLU(torch.nn.Module):
    """x (B, 1, 4, 4) → r = ReLU(W1 x + b1) (B, 12) → logits (B, 3); features 0–3 are dead (r = 0), the others alive."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 12), torch.nn.ReLU())
        self.fc = torch.nn.Linear(12, 3)
        with torch.no_grad():
            self.body[1].bias[:4] = -100.0
            self.body[1].bias[4:] = 10.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def test_soteria_prunes_the_features_its_ranking_names_also_on_relu_models():
    """The ranking computed directly (Jacobian of r w.r.t. x, per sample, / (r + 0.1) as the authors' code does);
    dead ReLU features give finite scores, so the requested fraction is pruned."""
    model = TinyReLU().eval()
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    jac = torch.autograd.functional.jacobian(lambda inp: model.body(inp), x)  # (B, F, B, 1, 4, 4)
    per_sample = torch.stack([jac[b, :, b].flatten(1).norm(dim=1) for b in range(5)])  # (B, F)
    r = model.body(x).detach()
    scores = (per_sample.double() / (r.double() + 0.1)).sum(0)
    assert torch.isfinite(scores).all() and (r[:, :4] == 0).all()
    expected_pruned = scores < np.percentile(scores.numpy(), 50)
    update = {"fc.weight": torch.ones(3, 12), "fc.bias": torch.ones(3)}
    ctx = DefenseContext(lambda: TinyReLU().eval(), x, torch.zeros(5, dtype=torch.long), torch.Generator(), "fedsgd")
    out = build_defense("soteria", {"ratio": 0.5}).apply(update, ctx)
    pruned = (out["fc.weight"] == 0).all(0)
    assert torch.equal(pruned, expected_pruned) and int(pruned.sum()) == 6
    assert torch.equal(out["fc.bias"], update["fc.bias"])


def test_defend_leaves_buffers_and_the_caller_alone():
    update = {"w": torch.ones(10), "bn.running_mean": torch.ones(3)}
    out = defend([build_defense("prune", {"ratio": 0.5})], update, {"w": torch.zeros(10)}, {"w"},
                 DefenseContext(None, None, None, torch.Generator(), "fedsgd"))
    assert torch.equal(out["bn.running_mean"], torch.ones(3)) and torch.equal(update["w"], torch.ones(10))
    assert int((out["w"] == 0).sum()) == 5


def test_labels_and_grids():
    assert defense_label([]) == "none"
    assert defense_label([ComponentSpec(name="dp", sigma=0.1)]) == "dp(sigma=0.1)"
    assert defense_label([ComponentSpec(name="prune")]) == "prune"  # only what differs from the defaults
    assert defense_label([ComponentSpec(name="dp", clip=1.0, sigma=0.1)]) == "dp(sigma=0.1)"
    assert defense_label([ComponentSpec(name="secagg")]) == "secagg"
    assert defense_label([ComponentSpec(name="prune")], full=True) == "prune(ratio=0.5)"
    grid = expand_grid(ComponentSpec(name="dp", sigma=[0.0, 0.1], clip=[1.0, 2.0]))
    assert [(s.params["sigma"], s.params["clip"]) for s in grid] == [(0.0, 1.0), (0.0, 2.0), (0.1, 1.0), (0.1, 2.0)]
    assert set(DEFENSES.names()) >= {"dp", "prune", "quantize", "soteria"}


@pytest.mark.parametrize("defenses, compare, message", [
    ([{"name": "dp", "sgma": 1.0}], None, "scenario key 'defenses.0.sgma': unknown parameter of defense 'dp' "
                                          "(did you mean 'sigma'?); allowed: clip, sigma, delta"),
    ([{"name": "dp", "sigma": -1.0}], None, "scenario key 'defenses.0.sigma': Input should be greater than or equal"),
    ([{"name": "prune", "ratio": 1.0}], None, "scenario key 'defenses.0.ratio': Input should be less than 1"),
    ([{"name": "quantize", "mode": "ternary"}], None, "scenario key 'defenses.0.mode': got 'ternary'; allowed:"),
    ([{"name": "prun"}], None, "unknown defense 'prun' (did you mean 'prune'?)"),
    ([], {"defenses": [{"name": "dp", "sigma": [0.1, -0.1]}]}, "scenario key 'compare.defenses.0.sigma': Input"),
    ([], {"defenses": [{"name": "soterai"}]}, "scenario key 'compare.defenses.0.name': unknown defense 'soterai'"),
    ([], {"metric": "accuracy"}, "scenario key 'compare.metric': unknown metric 'accuracy'; choose one of:"),
    ([], {"grid": {"training.batch_sizee": [1, 2]}},
     "scenario key 'compare.grid.\"training.batch_sizee\"': unknown key 'training.batch_sizee' (did you mean "
     "'training.batch_size'?)"),
    ([], {"grid": {"federation": [1, 2]}}, "'federation' is a section; name a key in it"),
    ([], {"grid": {"output.dir": ["a", "b"]}}, "scenario key 'compare.grid.\"output.dir\"': cannot be swept"),
    ([], {"grid": {"training.batch_size": [1, 0]}}, "scenario key 'training.batch_size': Input should be greater "
                                                    "than or equal to 1"),
])
def test_bad_defense_settings_exit_2_with_one_line(tmp_path, write_scenario, cli, defenses, compare, message):
    raw = tiny(defenses=defenses, output={"dir": str(tmp_path / "runs")})
    if compare is not None:
        raw["compare"] = compare
    code, out, err = cli("compare" if compare is not None else "run", write_scenario(raw))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_compare_needs_settings(tmp_path, write_scenario, cli):
    code, _, err = cli("compare", write_scenario(tiny()), "--out", tmp_path / "cmp")
    assert code == 2 and "nothing to compare" in err and not (tmp_path / "cmp").exists()


def test_compare_sweeps_any_scenario_key_with_equal_seeds(tmp_path, write_scenario, cli):
    raw = tiny(name="sweep", federation={"num_clients": 3, "clients_per_round": 2, "rounds": 2},
               attacks=[{"name": "idlg", "iterations": 3}], metrics=["psnr", "ssim", "mse"])
    raw["compare"] = {"grid": {"training.batch_size": [1, 2], "threat_model.rounds": [[1], [2]]}}
    code, out, err = cli("compare", write_scenario(raw), "--out", tmp_path / "cmp")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    assert sorted(zip(table["training.batch_size"], table["threat_model.rounds"])) == [
        (1, "[1]"), (1, "[2]"), (2, "[1]"), (2, "[2]")]  # every combination, as its own setting
    assert "none · training.batch_size=1, threat_model.rounds=[1]" in set(table["setting"])
    runs = sorted((tmp_path / "cmp" / "runs").iterdir())
    assert len({tuple(pd.read_csv(r / "metrics.csv")["clients"]) for r in runs}) == 1  # same seeds, same clients
    assert [sorted(set(pd.read_csv(r / "results.csv")["round"])) for r in runs] == [[1], [2], [1], [2]]
    for key in ("training-batch_size", "threat_model-rounds"):
        assert (tmp_path / "cmp" / "comparison-files" / f"by-{key}.png").is_file()
    assert "Leakage against each swept scenario key" in (tmp_path / "cmp" / "comparison.md").read_text()


def test_secagg_cohort_sweep_scores_every_image_of_the_cohort(tmp_path, write_scenario, cli):
    """The shipped cohort scenarios' settings, and a small run of the same sweep: one aggregate per round, scored
    image by image against the union of the cohort's batches."""
    from fl_sim.scenario import load_scenario
    from fl_sim.scenario.comparison import setting_scenario, setting_slug, settings

    for name in ("secagg_cohort_lenet", "secagg_cohort_convnet"):
        loaded = load_scenario(ROOT / "scenarios" / f"{name}.toml")
        planned = [s for s in settings(loaded) if s.defenses]
        assert [dict(s.values) for s in planned] == [{"federation.clients_per_round": c, "training.batch_size": b}
                                                     for c in (2, 4, 8, 16) for b in (1, 2)]
        assert all(setting_scenario(loaded, s, setting_slug(s)).federation.clients_per_round
                   == dict(s.values)["federation.clients_per_round"] for s in planned)
    raw = tiny(name="cohort", federation={"num_clients": 4, "rounds": 1}, training={"batch_size": 1},
               attacks=[{"name": "dlg", "iterations": 40}], metrics=["ssim"])
    raw["compare"] = {"baseline": False, "defenses": [{"name": "secagg"}],
                      "grid": {"federation.clients_per_round": [2, 4], "training.batch_size": [1, 2]}}
    code, _, err = cli("compare", write_scenario(raw), "--out", tmp_path / "cmp")
    assert code == 0, err
    table = pd.read_csv(tmp_path / "cmp" / "comparison.csv")
    cohort, batch = table["federation.clients_per_round"], table["training.batch_size"]
    assert sorted(zip(cohort, batch)) == [(2, 1), (2, 2), (4, 1), (4, 2)]
    assert (table["images"] == cohort * batch).all() and (table["reconstructions"] == 1).all()
    for c, b, n, fraction in zip(cohort, batch, table["images"], table["images_recovered_fraction"], strict=True):
        folder = next((tmp_path / "cmp" / "runs").glob(f"*clients_per_round={c}_batch_size={b}"))
        rows = pd.read_csv(folder / "results.csv").query("metric == 'ssim' and image == image")  # per-image rows
        assert set(rows["client"]) == {-1} and len(rows) == n
        assert fraction == pytest.approx((rows["value"] >= 0.5).mean())  # no baseline for an aggregate
    assert table.loc[(cohort == 2) & (batch == 1), "images_recovered_fraction"].item() == 1.0  # 2 digits, inverted


# --- the comparison: DLG on the DLG LeNet under noise and pruning ------------------------------------------
@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    """4 clients × DLG (batch 1, real MNIST) under none, dp σ ∈ {0.01, 0.1}, prune ∈ {0.5, 0.9}."""
    from click.testing import CliRunner

    from fl_sim.cli import cli

    root = tmp_path_factory.mktemp("compare")
    raw = tiny(name="cmp", federation={"num_clients": 4, "clients_per_round": 4, "rounds": 2},
               training={"protocol": "fedsgd", "batch_size": 1, "lr": 0.1},
               threat_model={"rounds": [1], "record": "attacked", "baseline": False},  # priors-only: tests/test_rero
               attacks=[{"name": "dlg", "iterations": 60}],
               metrics=["psnr", "ssim", "mse"])
    raw["compare"] = {"defenses": [{"name": "dp", "clip": 1.0, "sigma": [0.01, 0.1]},
                                   {"name": "prune", "ratio": [0.5, 0.9]}]}
    import tomli_w

    (root / "cmp.toml").write_text(tomli_w.dumps(raw))  # the test below runs it again
    result = CliRunner().invoke(cli, ["compare", str(root / "cmp.toml"), "--out", str(root / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "out"


def test_dlg_leakage_falls_as_noise_or_pruning_rises(comparison):
    table = pd.read_csv(comparison / "comparison.csv").set_index("setting")
    psnr = table["psnr_mean"]
    assert psnr["none"] > psnr["dp(sigma=0.01)"] - 1.0 > psnr["dp(sigma=0.1)"] - 2.0
    assert psnr["none"] > psnr["prune(ratio=0.9)"] + 3.0
    assert psnr["prune(ratio=0.5)"] > psnr["prune(ratio=0.9)"] - 1.0
    assert psnr["none"] > psnr["dp(sigma=0.1)"] + 3.0


def test_comparison_report_has_every_setting(comparison):
    table = pd.read_csv(comparison / "comparison.csv")
    assert len(set(table["setting"])) == 5 and len(table) == 5  # one attack
    assert table.loc[table.setting == "none", "acc_drop"].item() == 0
    assert np.isfinite(table.loc[table.setting.str.startswith("dp"), "epsilon"]).all()
    html = (comparison / "comparison.html").read_text()
    assert "Privacy against utility" in html and html.count("data:image/png;base64,") >= 2
    for setting in table["setting"]:
        assert setting in html
    md = (comparison / "comparison.md").read_text()
    assert "comparison-files/privacy-utility.png" in md and (comparison / "comparison-files" / "dlg.png").is_file()
    assert len(list((comparison / "runs").glob("*/report.html"))) == 5


def test_local_dp_is_flowers_mod_on_train_only(tmp_path):
    fedavg = {"protocol": "fedavg", "local_steps": 2, "batch_size": 2, "lr": 0.1}
    local_dp = {"name": "local-dp", "clip": 1000.0, "sensitivity": 1.0, "epsilon": 1000.0, "delta": 1e-5}
    seen, params = observed(tmp_path, [local_dp], training=fedavg, federation={"rounds": 1})
    clean, _ = observed(tmp_path, [], "plain", training=fedavg, federation={"rounds": 1})
    expected = build_defense("local-dp", {k: v for k, v in local_dp.items() if k != "name"}).noise_std
    assert expected == pytest.approx(math.sqrt(2 * math.log(1.25e5)) / 1000)
    noise = torch.cat([(a.update[n] - b.update[n]).flatten() for a, b in zip(seen, clean, strict=True)
                       for n in params])
    assert noise.std().item() == pytest.approx(expected, rel=0.05) and abs(noise.mean().item()) < expected / 20
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert metrics["eval_acc"].notna().all()  # federated evaluation is not wrapped by the mod


def test_local_dp_needs_fedavg(write_scenario, cli, tmp_path):
    code, _, err = cli("run", write_scenario(tiny(defenses=[{"name": "local-dp"}],
                                                  output={"dir": str(tmp_path / "runs")})))
    assert code == 2 and "defends only training.protocol = 'fedavg', the scenario uses 'fedsgd'" in err


def per_sample_clipped_mean(obs, x, y, scenario, clip):
    """Reference DP-SGD gradient without noise: the per-sample gradients clipped to ``clip``, summed, over the
    expected batch size (Poisson batches: Opacus divides by the expected size, not the realised one)."""
    import torch.nn.functional as F

    model = prepare(scenario).model()
    model.load_state_dict(obs.global_state)
    names, params = zip(*model.named_parameters(), strict=True)
    total = [torch.zeros_like(p) for p in params]
    for i in range(len(y)):
        grads = torch.autograd.grad(F.cross_entropy(model(obs.normalization.normalize(x[i:i + 1])), y[i:i + 1]),
                                    params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        for t, g in zip(total, grads, strict=True):
            t += g * min(1.0, clip / (float(norm) + 1e-6))
    return {n: t / scenario.training.batch_size for n, t in zip(names, total, strict=True)}


def test_dp_sgd_sends_opacus_clipped_per_sample_mean(tmp_path):
    raw = tiny(defenses=[{"name": "dp-sgd", "sigma": 0.0, "clip": 0.05}], training={"batch_size": 4},
               federation={"rounds": 1})
    store, seen = run_inprocess(tmp_path, raw)
    scenario = scenario_from_dict(raw)
    for obs in seen:
        x, y = SecretLedger(store.layout).get(obs.server_round, obs.client).examples(prepare(scenario).data.train)
        expected = per_sample_clipped_mean(obs, x, y, scenario, 0.05)
        for name, value in expected.items():
            torch.testing.assert_close(obs.update[name], value, rtol=1e-4, atol=1e-7)


def test_dp_sgd_noise_and_the_model_the_attacker_sees(tmp_path):
    raw = tiny(defenses=[{"name": "dp-sgd", "sigma": 1.0, "clip": 1e-6}], training={"batch_size": 4},
               federation={"rounds": 1}, model={"name": "convnet"})
    store, seen = run_inprocess(tmp_path, raw)
    fed = prepare(scenario_from_dict(raw))
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in fed.model().modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in fed.model().modules())
    assert not any("running_mean" in k for k in seen[0].global_state)
    params = [n for n, _ in fed.model().named_parameters()]
    noise = torch.cat([obs.update[n].flatten() for obs in seen for n in params])
    assert noise.std().item() == pytest.approx(1e-6 / 4, rel=0.05)  # σ·C / batch size
    plain = prepare(scenario_from_dict(tiny(model={"name": "convnet"})))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.model().modules())  # only dp-sgd fixes it


# --- secure aggregation (Flower's SecAgg+) ------------------------------------------------------------------
def test_secagg_observation_is_the_weighted_mean_of_the_clients_updates(tmp_path, monkeypatch):
    from fl_sim.engines import InProcessGrid
    from fl_sim.federation.protocol import EVALUATION_RECORD as SECRET_RECORD

    replies = []
    deliver = InProcessGrid._deliver
    monkeypatch.setattr(InProcessGrid, "_deliver", lambda self, msg: replies.append(deliver(self, msg)) or replies[-1])
    federation = {"num_clients": 4, "clients_per_round": 3, "rounds": 2}
    secure, params = observed(tmp_path, [{"name": "secagg"}], "secagg", federation=federation)
    assert [(o.server_round, o.client) for o in secure] == [(1, -1), (2, -1)]  # one aggregate per round
    assert not any(SECRET_RECORD in r.content for r in replies if not r.has_error())  # no Secret reaches it
    plain, _ = observed(tmp_path, [], "plain", federation=federation)
    round1 = [o for o in plain if o.server_round == 1]
    weights = torch.tensor([o.meta.num_examples for o in round1], dtype=torch.float64)
    assert secure[0].meta.num_examples == int(weights.sum()) == secure[0].meta.batch_size
    for name in params:
        mean = sum(w * o.update[name].double() for w, o in zip(weights, round1, strict=True)) / weights.sum()
        torch.testing.assert_close(secure[0].update[name].double(), mean, atol=2e-5, rtol=0)  # SecAgg+ quantisation
    store = RunStore.open(tmp_path / "secagg")
    secret = SecretLedger(store.layout).get(1, -1)
    fed = prepare(scenario_from_dict(tiny(federation=federation)))
    plan = LocalTraining.from_scenario(scenario_from_dict(tiny(federation=federation)).training)
    union = np.concatenate([fed.batches(o.client, 1, plan)[0] for o in round1])
    assert np.array_equal(secret.batches[0], union)  # scored against the union of the clients' batches


def test_secagg_round_is_attacked_as_one_batch_and_scored(tmp_path):
    raw = tiny(federation={"num_clients": 4, "clients_per_round": 3, "rounds": 1}, defenses=[{"name": "secagg"}],
               attacks=[{"name": "idlg", "iterations": 5}], metrics=["psnr"])
    store, _ = run_inprocess(tmp_path, raw)
    rows = pd.read_csv(store.root / "results.csv")
    assert set(rows["client"]) == {-1} and rows.loc[rows.metric == "failed", "value"].tolist() == [0.0]
    assert (rows["defense"] == "secagg").all()  # every parameter at its default
    assert (store.root / "reconstructions" / "round-0001" / "idlg-client--001.safetensors").is_file()


def test_secagg_needs_two_clients_per_round(write_scenario, cli, tmp_path):
    code, _, err = cli("run", write_scenario(tiny(federation={"clients_per_round": 1}, defenses=[{"name": "secagg"}],
                                                  output={"dir": str(tmp_path / "runs")})))
    assert code == 2 and "SecAgg+ needs at least 2 clients per round" in err and not (tmp_path / "runs").exists()


def test_compare_again_keeps_finished_settings(comparison, cli):
    before = {p: p.stat().st_mtime_ns for p in (comparison / "runs").glob("*/results.csv")}
    code, _, err = cli("compare", comparison.parent / "cmp.toml", "--out", comparison)
    assert code == 0, err
    assert {p: p.stat().st_mtime_ns for p in (comparison / "runs").glob("*/results.csv")} == before
    assert (comparison / "comparison.html").is_file()
    # the same folder for a changed scenario: refused, nothing rerun (its finished settings would be stale)
    changed = ("--set", "attacks.0.iterations=61")
    code, _, err = cli("compare", comparison.parent / "cmp.toml", "--out", comparison, *changed)
    assert code == 2 and "ran with another scenario (attacks differs)" in err and len(err.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in (comparison / "runs").glob("*/results.csv")} == before


def test_the_comparison_reads_epsilon_from_the_runs_privacy_csv_without_rebuilding_a_federation(comparison,
                                                                                                   monkeypatch):
    import json

    import fl_sim.federation.setup
    from fl_sim.report.comparison import build_comparison

    runs = sorted((comparison / "runs").iterdir())
    assert all(json.loads((r / "run.json").read_text())["classes"] == [str(c) for c in range(10)] for r in runs)
    assert [(r / "privacy.csv").is_file() for r in runs].count(True) == 2  # the two dp settings
    monkeypatch.setattr(fl_sim.federation.setup, "prepare", lambda *_: pytest.fail("the report rebuilt a federation"))
    before = pd.read_csv(comparison / "comparison.csv")
    build_comparison(comparison, runs, "cmp")
    after = pd.read_csv(comparison / "comparison.csv")
    pd.testing.assert_frame_equal(after, before)
    for run in (r for r in runs if (r / "privacy.csv").is_file()):
        worst = pd.read_csv(run / "privacy.csv")["epsilon"].max()
        parameters = defense_label(RunStore.open(run).scenario().defenses, full=True)
        assert after.loc[after.parameters == parameters, "epsilon"].iloc[0] == pytest.approx(worst)


def test_every_defense_declares_its_stage_through_its_base_class():
    from defenses import DEFENSES, DefenseType, Stage
    from defenses.base import Defense, Params

    stages = {name: kind.stage for name, kind in DEFENSES.items()}
    assert stages == {"dp": Stage.UPDATE, "prune": Stage.UPDATE, "quantize": Stage.UPDATE, "soteria": Stage.UPDATE,
                      "dp-sgd": Stage.TRAINING, "feature-prune": Stage.FEATURES, "feature-noise": Stage.FEATURES,
                      "local-dp": Stage.MESSAGE, "secagg": Stage.PROTOCOL}
    assert {n for n, k in DEFENSES.items() if k.accounted} == {"dp", "dp-sgd", "local-dp"}
    with pytest.raises(TypeError, match="must implement one stage"):
        DefenseType(Params, Defense, "the abstract base is no defense")
