"""The defense comparison report: privacy (leakage) against utility (test accuracy), one row per setting.

Per setting and attack: every score's mean ± std over all attacked (round, client) pairs, the
recovered fraction, the final test accuracy and its drop against no defense, ε where the defense
defines one; a privacy–utility plot; and one image grid per attack with the same clients' batches
reconstructed under every setting.
"""

from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from defenses import Releases, accountants, defense_label
from fl_sim.base.atomic import write_text
from fl_sim.leakage.metrics import SCORES
from fl_sim.leakage.scoring import BASELINE
from fl_sim.report import tables
from fl_sim.report.images import Picture, file_slug
from fl_sim.report.plots import attack_colors, png
from fl_sim.report.render import render_html, render_markdown
from fl_sim.report.runs import RunData, load_run
from fl_sim.report.setting_grids import setting_grids
from fl_sim.report.tables import RecoveryRule, fmt, label
from fl_sim.store import ComparisonLayout, RunLayout

log = logging.getLogger("fl_sim")
MARKERS = "osD^v<>p*hX"
MAX_LINES = 8  # per panel of key_panels


@dataclass(frozen=True)
class Setting:
    run: RunData
    label: str  # "none", "dp(sigma=0.01)", "none · training.batch_size=4", ...
    kind: str  # the (first) defense's name, or "none"
    epsilon: float | None  # the worst client's ε against the curious server (the run's privacy.csv)
    values: tuple[tuple[str, Any], ...] = ()  # the swept keys' values in this setting (compare.grid)
    parameters: str = ""  # every defense parameter, defaults included


def load_settings(roots: list[Path], keys: list[str] | None = None) -> list[Setting]:
    """The settings' run folders; ``keys``: the swept scenario keys, read back from each resolved scenario. Labels
    show what differs from the defaults and every defense parameter the settings vary."""
    from fl_sim.scenario.comparison import CompareSetting, swept_parameters

    runs = [load_run(root) for root in roots]
    swept = swept_parameters([list(r.scenario.defenses) for r in runs])
    settings = []
    for run in runs:
        specs = list(run.scenario.defenses)
        values = tuple((k, scenario_value(run.scenario.to_toml_dict(), k)) for k in keys or [])
        settings.append(Setting(run, CompareSetting(specs, values, swept).label, specs[0].name if specs else "none",
                                run.worst_epsilon(), values, defense_label(specs, full=True)))
    return settings


def scenario_value(raw: dict[str, Any], key: str) -> Any:
    """The value of a dotted key in a resolved scenario (None if unset)."""
    node: Any = raw
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def comparison_table(settings: list[Setting], rule: RecoveryRule) -> pd.DataFrame:
    """One row per (setting, attack): the swept keys' values, score means/stds, recovered fractions (of the
    reconstructions and of the attacked images), final accuracy and its drop against the no-defense setting with
    the same swept values, ε, and the setting's ReRo bound beside its measured success (:func:`rero`)."""
    none_acc = {_key(s): _final_acc(s.run) for s in settings if s.kind == "none"}
    rows = []
    for s in settings:
        recs = tables.reconstructions(s.run.results)
        head = tables.headline(recs, rule).set_index("attack") if not recs.empty else pd.DataFrame()
        imgs = s.run.images
        recovered = tables.images_recovered(imgs, rule) if not imgs.empty else pd.Series(dtype=bool)
        bound = rero(s.run, imgs, rule)
        acc = _final_acc(s.run)
        for attack, group in recs.groupby("attack") if not recs.empty else []:
            of_attack = recovered[imgs["attack"] == attack] if not imgs.empty else recovered
            row: dict[str, Any] = {"setting": s.label, "defense": s.kind, "parameters": s.parameters,
                                   "attack": attack,
                                   **{key: _cell_value(v) for key, v in s.values},
                                   "epsilon": s.epsilon, "final_test_acc": acc,
                                   "acc_drop": none_acc.get(_key(s), math.nan) - acc,
                                   "reconstructions": len(group), "failed": int(group["failed"].sum()),
                                   "recovered_fraction": head.loc[attack, "recovered_fraction"],
                                   "images": len(of_attack),
                                   "images_recovered_fraction": of_attack.mean() if len(of_attack) else math.nan,
                                   **bound}
            for score in SCORES:
                row[f"{score}_mean"] = group[score].mean()
                row[f"{score}_std"] = group[score].std()
            rows.append(row)
    return pd.DataFrame(rows)


KAPPA_CONFIDENCE = 0.95  # κ is the prior-only success rate's one-sided upper confidence limit at this level


def rero(run: RunData, imgs: pd.DataFrame, rule: RecoveryRule) -> dict[str, float]:
    """The setting's reconstruction-robustness columns, per attacked image and under ``rule`` alone (the ReRo
    success event, the same for attacks and baselines):

    - ``measured_success``: the strongest attack's fraction of attacked images that meet the rule (failed: not);
    - ``baseline_success``: the best prior-only baseline's fraction;
    - ``rero_kappa``: κ, the largest one-sided :data:`KAPPA_CONFIDENCE` Clopper–Pearson upper limit of a
      baseline's success rate (k of n images; 1 where none ran) — the stated floor: 0 of n successes does not
      make κ = 0;
    - ``rero_bound``: η, the worst client's bound at κ from its defense's DP guarantee (NaN without one).
    """
    out = {"measured_success": math.nan, "baseline_success": math.nan, "rero_kappa": 1.0}
    if not imgs.empty:
        per_attack = [(tables.image_success(g, rule).mean(), g.get(f"{BASELINE}{rule.metric}"),
                       tables.image_success(g, rule, baseline_rows=True)) for _, g in imgs.groupby("attack")]
        out["measured_success"] = max(m for m, _, _ in per_attack)
        tried = [(int(ok[b.notna()].sum()), int(b.notna().sum())) for _, b, ok in per_attack if b is not None]
        if tried:
            out["baseline_success"] = max(k / n if n else math.nan for k, n in tried)
            out["rero_kappa"] = max(_upper_limit(k, n) for k, n in tried)
    return out | {"rero_bound": reconstruction_bound(run, out["rero_kappa"])}


def _upper_limit(k: int, n: int) -> float:
    """One-sided upper confidence limit of a success probability after k successes in n trials (Clopper–Pearson)."""
    from scipy.stats import beta

    return 1.0 if n == 0 or k >= n else float(beta.ppf(KAPPA_CONFIDENCE, k + 1, n - k))


def reconstruction_bound(run: RunData, kappa: float) -> float:
    """η of the run's DP defense for its worst client (every client's releases in privacy.csv; the largest bound);
    NaN without exactly one DP defense (several are not composed here) or for a privacy.csv without releases."""
    accounted = accountants(run.scenario.defenses)
    columns = ["participations", "steps_per_round", "batch_rate"]
    if len(accounted) != 1 or run.privacy.empty or not set(columns) <= set(run.privacy):
        return math.nan
    name, defense = accounted[0]
    rows = run.privacy[run.privacy["defense"] == name][columns].drop_duplicates()
    return max((defense.reconstruction_bound(Releases(int(p), int(t), float(q)), kappa)
                for p, t, q in rows.itertuples(index=False)), default=math.nan)


def _key(s: Setting) -> tuple[tuple[str, Any], ...]:
    """The setting's swept values, hashable (its no-defense counterpart has the same)."""
    return tuple((k, _cell_value(v)) for k, v in s.values)


def _cell_value(value: Any) -> Any:
    """A swept value as a table cell (lists, e.g. threat_model.rounds, as their text)."""
    from fl_sim.scenario.comparison import value_text

    return value_text(value) if isinstance(value, list) else value


def key_panels(table: pd.DataFrame, key: str, others: list[str], colors: dict[str, str]) -> bytes:
    """MSE, SSIM, PSNR and the fraction of attacked images recovered against one swept key: a line per attack and
    defense — and per value of the ``others`` swept keys when that makes at most :data:`MAX_LINES` lines, else
    their settings averaged. Error bars: the std of the settings' means where a point averages settings, else the
    setting's std over its reconstructions."""
    values = list(dict.fromkeys(table[key]))
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    position = {v: (float(v) if numeric else i) for i, v in enumerate(values)}
    series = ["attack", "defense", *others]
    if table.groupby(series).ngroups > MAX_LINES:
        series = ["attack", "defense"]
    styles = dict(zip(table.groupby(series).groups, itertools.cycle(["-", "--", ":", "-."]), strict=False))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4), layout="constrained")
    for ax, score in zip(axes, ("mse_mean", "ssim_mean", "psnr_mean", "images_recovered_fraction"), strict=True):
        for name, rows in table.groupby(series):
            line = panel_line(rows, key, score, values)
            ax.errorbar([position[v] for v in line.index], line["mean"], yerr=line["std"], marker="o", ms=4,
                        capsize=3, color=colors[name[0]], ls=styles[name],
                        label=", ".join(f"{k.rsplit('.', 1)[-1]}={v}" if k in others else str(v)
                                        for k, v in zip(series, name, strict=True)))
        ax.set_xlabel(key)
        ax.set_ylabel(label(score.removesuffix("_mean")) if score.endswith("_mean") else "images recovered")
        if not numeric:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, title=", ".join(k.rsplit(".", 1)[-1] for k in series), title_fontsize=7)
    return png(fig)


def panel_line(rows: pd.DataFrame, key: str, score: str, values: list[Any]) -> pd.DataFrame:
    """One line of :func:`key_panels`: per value of ``key`` (in ``values``' order, absent ones left out) the mean of
    the rows' ``score`` and its error bar — the std of the rows' values where a point has several rows (settings),
    else that row's ``<metric>_std`` (its spread over the reconstructions; none for a fraction)."""
    grouped = rows.groupby(key, sort=False)
    line = grouped[score].agg(["mean", "std", "size"])
    if score.endswith("_mean"):
        line["std"] = line["std"].where(line["size"] > 1, grouped[score.replace("_mean", "_std")].first())
    return line[["mean", "std"]].reindex(values).dropna(how="all")


def _final_acc(run: RunData) -> float:
    return float(run.metrics["test_acc"].iloc[-1]) if not run.metrics.empty else math.nan


def setting_numbers(table: pd.DataFrame) -> dict[str, int]:
    """Setting label → its number in the plot and the table (1, 2, … in comparison order)."""
    return {name: i for i, name in enumerate(dict.fromkeys(table["setting"]), start=1)} if not table.empty else {}


def privacy_utility_figure(table: pd.DataFrame, metric: str, colors: dict[str, str]) -> plt.Figure:
    """Leakage ``metric`` (mean ± std over reconstructions) against final test accuracy, one point per setting and
    attack, numbered as in the table (settings at one point share a label; labels placed by adjustText); legend
    outside the data, the better corner (more utility, less leakage) marked."""
    from adjustText import adjust_text

    fig, ax = plt.subplots(figsize=(8.5, 4.8), layout="constrained")
    numbers = setting_numbers(table)
    kinds = sorted(set(table["defense"])) if not table.empty else []
    points = table[table[f"{metric}_mean"].notna()] if not table.empty else table
    for row in points.itertuples(index=False):
        y, sd = getattr(row, f"{metric}_mean"), getattr(row, f"{metric}_std")
        ax.errorbar(100 * row.final_test_acc, y, yerr=None if math.isnan(sd) else sd, capsize=3, ms=7,
                    fmt=MARKERS[kinds.index(row.defense) % len(MARKERS)], color=colors[row.attack], alpha=0.85)
    ax.margins(0.12)
    higher_leaks = tables.higher_is_better(metric)
    better = ax.text(0.99, 0.02 if higher_leaks else 0.98, "better ↘" if higher_leaks else "better ↗",
                     transform=ax.transAxes, ha="right", va="bottom" if higher_leaks else "top", fontsize=8,
                     color="#2a8a3e", bbox={"boxstyle": "round", "fc": "white", "ec": "#2a8a3e", "lw": 0.6})
    if not points.empty:  # one label per setting, at its highest point; settings at one point share it
        y_span = float(np.ptp(points[f"{metric}_mean"])) or 1.0
        tops = points.groupby("setting", sort=False).agg(x=("final_test_acc", "first"), y=(f"{metric}_mean", "max"))
        tops = tops.assign(x=100 * tops["x"], _x=lambda t: t["x"].round(1), _y=lambda t: (t["y"] / y_span).round(2))
        texts, anchors = [], []
        for _, group in tops.groupby(["_x", "_y"], sort=False):
            x, y = group["x"].mean(), group["y"].mean()
            names = ", ".join(str(n) for n in sorted(numbers[s] for s in group.index))
            texts.append(ax.text(x, y + 0.04 * y_span, names, fontsize=8, ha="center", va="bottom"))
            anchors.append((x, y))
        adjust_text(texts, x=list(100 * points["final_test_acc"]), y=list(points[f"{metric}_mean"]),
                    target_x=[a for a, _ in anchors], target_y=[b for _, b in anchors], objects=[better], ax=ax,
                    arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})
    ax.set_xlabel("final test accuracy (%)  → more utility")
    ax.set_ylabel(f"{label(metric)} {'↑' if higher_leaks else '↓'} = more leakage")
    ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=a) for a, c in colors.items()]
    handles += [plt.Line2D([], [], color="0.3", marker=MARKERS[i % len(MARKERS)], ls="", label=k)
                for i, k in enumerate(kinds)]
    if handles:
        ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  title="colour: attack\nmarker: defense\nnumber: setting (table #)", title_fontsize=8)
    return fig


def swept_parameter(settings: list[Setting]) -> tuple[str, str, dict[str, float]] | None:
    """(defense, parameter, setting label → value) when the non-baseline settings are one defense whose one
    numeric parameter varies (a sweep); None otherwise."""
    specs = [s.run.scenario.defenses for s in settings if s.label != "none"]
    if len(specs) < 2 or any(len(d) != 1 for d in specs) or len({d[0].name for d in specs}) != 1:
        return None
    keys = {k for d in specs for k in d[0].params}
    varying = [k for k in keys if len({repr(d[0].params.get(k)) for d in specs}) > 1]
    values = [d[0].params.get(varying[0]) for d in specs] if len(varying) == 1 else []
    if not values or not all(isinstance(v, int | float) for v in values):
        return None
    labels = [s.label for s in settings if s.label != "none"]
    return specs[0][0].name, varying[0], dict(zip(labels, map(float, values), strict=True))


def build_comparison(out: Path, run_dirs: list[Path], name: str, metric: str = "ssim", keys: list[str] | None = None,
                     rule: RecoveryRule = tables.DEFAULT_RULE) -> Path:
    """comparison.html / .md / .csv in ``out`` from the setting run folders (``keys``: the swept scenario keys);
    returns the HTML path."""
    layout = ComparisonLayout(Path(out))
    files = layout.FIGURES
    settings = load_settings(run_dirs, keys)
    table = comparison_table(settings, rule)
    for row in table[table["measured_success"] > table["rero_bound"]].drop_duplicates("setting").itertuples():
        log.warning("%s: measured success %.3g above its ReRo bound %.3g — with few images possible by chance, "
                    "otherwise a bug in the attack scoring or the accounting", row.setting, row.measured_success,
                    row.rero_bound)
    attacks = sorted(set(table["attack"])) if not table.empty else []
    colors = attack_colors(attacks)
    plot = Picture(f"{files}/privacy-utility.png", png(privacy_utility_figure(table, metric, colors)),
                   f"{label(metric)} against final test accuracy, one point per setting (numbered as in the table) "
                   "and attack")
    grids = setting_grids([s.run for s in settings], [(s.label, s.parameters) for s in settings], attacks, files,
                          metric)
    sweep, sweep_picture = swept_parameter(settings), None
    if sweep is not None and not table.empty:  # one defense's one parameter: plotted as a swept key
        defense, parameter, values = sweep
        column = f"{defense}.{parameter}"
        rows = table[table["setting"].isin(values)].assign(**{column: lambda t: t["setting"].map(values)})
        sweep_picture = Picture(f"{files}/sweep.png", key_panels(rows.sort_values(column), column, [], colors),
                                f"MSE, SSIM, PSNR and the fraction of attacked images recovered against {defense} "
                                f"{parameter} (mean ± std over the reconstructions)")
    panels = [Picture(f"{files}/by-{file_slug(key)}.png", key_panels(table, key, [k for k in keys if k != key], colors),
                      f"MSE, SSIM, PSNR and the fraction of attacked images recovered against {key}")
              for key in keys or [] if not table.empty and table[key].nunique() > 1]
    unavailable = tables.unavailable(pd.concat([s.run.results for s in settings]))
    context = {
        "title": f"fl-sim defense comparison: {name}",
        "settings": settings, "colors": colors, "plot": plot, "grids": grids, "rule": str(rule), "sweep": sweep_picture,
        "panels": panels, "max_lines": MAX_LINES,
        "metric": label(metric), "summary": _display(table, rule, unavailable),
        "confidence": f"one-sided {KAPPA_CONFIDENCE:.0%} Clopper–Pearson",
        "unavailable": {label(k): v for k, v in unavailable.items()},
        "provenance": {label(k): v for k, v in tables.provenance(pd.concat([s.run.results for s in settings])).items()},
        "links": [(s.label, RunLayout(s.run.root).report.html.relative_to(out).as_posix()) for s in settings],
        "settings_table": settings_table(settings, table),
    }
    (layout.root / files).mkdir(parents=True, exist_ok=True)
    for picture in [plot, *(g.picture for g in grids), *panels, *([sweep_picture] if sweep_picture else [])]:
        (layout.root / picture.file).write_bytes(picture.png)
    table.to_csv(layout.table, index=False)
    write_text(layout.markdown, render_markdown(context, "comparison.md.j2"))
    write_text(layout.html, render_html(context, "comparison.html.j2"))
    return layout.html


def settings_table(settings: list[Setting], table: pd.DataFrame) -> pd.DataFrame:
    """# (as in the plot), label, every defense parameter (defaults included), ε."""
    numbers = setting_numbers(table)
    return pd.DataFrame([{"#": numbers.get(s.label, "–"), "setting": s.label, "every parameter": s.parameters,
                          "ε": tables.fmt_epsilon(s.epsilon)} for s in settings])


def _rate(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _display(table: pd.DataFrame, rule: RecoveryRule, unavailable: dict[str, str]) -> pd.DataFrame:
    if table.empty:
        return table
    numbers = setting_numbers(table)
    frame = table[["setting", "attack"]].copy()
    frame.insert(0, "#", [numbers[s] for s in table["setting"]])
    frame["ε"] = [tables.fmt_epsilon(e) for e in table["epsilon"]]
    for score in SCORES:
        missing = "unavailable" if score in unavailable else "–"
        frame[label(score)] = [missing if math.isnan(m) else fmt(score, m) + ("" if math.isnan(sd) else
                                                                               f" ± {fmt(score, sd)}")
                               for m, sd in zip(table[f"{score}_mean"], table[f"{score}_std"], strict=True)]
    frame[f"recovered ({rule})"] = [f"{v:.0%}" if not math.isnan(v) else "n/a" for v in table["recovered_fraction"]]
    frame["images recovered"] = [f"{v:.0%} of {n}" if not math.isnan(v) else "n/a"
                                 for v, n in zip(table["images_recovered_fraction"], table["images"], strict=True)]
    frame["measured success"] = [_rate(v) for v in table["measured_success"]]
    frame["ReRo bound η (κ)"] = ["–" if math.isnan(b) else f"{_rate(b)} ({_rate(k)})"
                                 for b, k in zip(table["rero_bound"], table["rero_kappa"], strict=True)]
    frame["failed"] = table["failed"]
    frame["final test accuracy (%)"] = [f"{100 * a:.1f}" for a in table["final_test_acc"]]
    frame["drop vs none (pp)"] = ["–" if math.isnan(d) else f"{100 * d:+.1f}" for d in table["acc_drop"]]
    return frame

