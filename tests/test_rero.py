"""Reconstruction robustness: the ReRo bounds against closed forms and published values, κ from the baselines,
and no attack measured above its DP setting's bound."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm

from defenses import Releases, build_defense
from defenses.rero import gdp_bound, profile_bound
from fl_sim.report.comparison import KAPPA_CONFIDENCE, _upper_limit
from tests.conftest import tiny


@pytest.mark.parametrize(("mu", "kappa", "table"), [(1.0, 0.5, 0.841345), (2.0, 0.5, 0.977250),
                                                    (1.0, 0.0227501, 0.158655), (0.5, 0.158655, 0.308538)])
def test_gdp_bound_equals_standard_normal_table_values(mu, kappa, table):
    # η = Φ(Φ⁻¹(κ) + μ) at points where Φ⁻¹(κ) is a round number: Φ(1), Φ(2), Φ(−1), Φ(−0.5) from the table
    assert gdp_bound(mu, kappa) == pytest.approx(table, abs=2e-6)


def test_the_gaussian_privacy_profile_gives_back_the_gdp_closed_form():
    """The trade-off function is the envelope of the privacy profile (Dong, Roth & Su 2022, Prop. 2.12): the
    profile bound over the exact Gaussian profile δ(ε) of Balle & Wang (2018) converges to Φ(Φ⁻¹(κ) + μ)."""
    for mu in (0.25, 1.0, 3.0):
        eps = np.linspace(0, 40, 40001)
        delta = norm.cdf(-eps / mu + mu / 2) - np.exp(eps) * norm.cdf(-eps / mu - mu / 2)
        for kappa in (1e-3, 0.05, 0.3):
            closed = norm.cdf(norm.ppf(kappa) + mu)
            assert profile_bound(zip(eps, delta, strict=True), kappa) == pytest.approx(closed, rel=1e-3, abs=1e-6)
            assert gdp_bound(mu, kappa) == pytest.approx(closed, rel=1e-9)


def test_bounds_lie_between_the_prior_and_one():
    assert gdp_bound(0.0, 0.2) == 0.2 and gdp_bound(math.inf, 0.2) == 1.0 and gdp_bound(5.0, 0.0) == 0.0
    assert profile_bound([(math.inf, 0.0)], 0.2) == 1.0 and profile_bound([(-0.1, 0.0)], 0.2) == 0.2
    with pytest.raises(ValueError, match="kappa"):
        gdp_bound(1.0, 1.5)


def test_dp_bound_is_the_gaussian_mechanism_over_its_participations():
    dp = build_defense("dp", {"clip": 1.0, "sigma": 4.0})
    # sensitivity 2C against noise σC: μ = 2√T / σ = 1 for T = 4, σ = 4
    assert dp.reconstruction_bound(Releases(4, 1, 1.0), 0.5) == pytest.approx(norm.cdf(1.0))
    assert dp.reconstruction_bound(Releases(0, 1, 1.0), 0.1) == pytest.approx(0.1)


def test_dp_sgd_bound_is_for_an_example_the_attacked_step_used():
    sgd = build_defense("dp-sgd", {"clip": 1.0, "sigma": 2.0})
    full = sgd.reconstruction_bound(Releases(4, 1, 1.0), 0.05)  # 4 unsubsampled steps: μ = √4 / σ = 1
    closed = norm.cdf(norm.ppf(0.05) + 1.0)
    assert closed <= full <= closed * 1.1  # the profile read at 31 δ values, each ε an accountant's upper bound
    # the example was in the attacked step's batch (no amplification there); the other 3 steps are subsampled
    one = norm.cdf(norm.ppf(0.05) + 0.5)
    sampled = sgd.reconstruction_bound(Releases(4, 1, 0.01), 0.05)
    assert one <= sampled < full and sampled <= one * 1.1
    assert sgd.reconstruction_bound(Releases(1, 1, 0.01), 0.05) == pytest.approx(one, rel=0.1)


def test_kappa_is_the_one_sided_upper_confidence_limit():
    # no success in n trials: 1 − (1 − c)^(1/n) exactly; all successes: 1
    for n in (1, 4, 16, 100):
        assert _upper_limit(0, n) == pytest.approx(1 - (1 - KAPPA_CONFIDENCE) ** (1 / n))
    assert _upper_limit(3, 3) == 1.0 and _upper_limit(0, 0) == 1.0
    assert _upper_limit(1, 10) > 0.1


def test_no_attack_succeeds_more_often_than_its_dp_settings_rero_bound(tmp_path):
    """12 clients of one image each, iDLG on all of them under no defense, dp σ = 8 and dp-sgd σ = 4; undefended,
    iDLG recovers every digit — far above the DP settings' bounds, so a defense that leaked would fail here."""
    import tomli_w
    from click.testing import CliRunner

    from fl_sim.cli import cli

    raw = tiny(name="rero", federation={"num_clients": 12, "clients_per_round": 12, "rounds": 1},
               training={"protocol": "fedsgd", "batch_size": 1, "lr": 0.1}, data={"dataset": "mnist5k",
                                                                                  "max_samples": 240},
               threat_model={"rounds": [1], "record": "attacked"}, attacks=[{"name": "idlg", "iterations": 20}],
               metrics=["ssim", "psnr"])
    raw["compare"] = {"defenses": [{"name": "dp", "clip": 1.0, "sigma": 8.0}, {"name": "dp-sgd", "sigma": 4.0}]}
    (tmp_path / "rero.toml").write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(cli, ["compare", str(tmp_path / "rero.toml"), "--out", str(tmp_path / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "comparison.csv").set_index("defense")
    none, dp, sgd = table.loc["none"], table.loc["dp"], table.loc["dp-sgd"]
    assert none["images"] == dp["images"] == 12  # dp-sgd's Poisson batches hold 0, 1 or more images
    assert math.isnan(none["rero_bound"]) and none["measured_success"] == 1.0
    kappa = _upper_limit(round(dp["baseline_success"] * 12), 12)
    assert dp["rero_kappa"] == pytest.approx(kappa) and kappa < 0.3
    assert dp["rero_bound"] == pytest.approx(norm.cdf(norm.ppf(kappa) + 2 / 8.0))  # one participation: μ = 2/σ
    for row in (dp, sgd):
        assert row["rero_kappa"] <= row["rero_bound"] < none["measured_success"]
        assert row["measured_success"] <= row["rero_bound"]
    html = (tmp_path / "out" / "comparison.html").read_text()
    assert "ReRo bound η (κ)" in html and "Clopper–Pearson" in html
