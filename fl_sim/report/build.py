"""Build the leakage report of one or several run folders: report.html (self-contained), report.md,
the figures the Markdown links to (report-files/) and the tables as CSV."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from defenses import ADVERSARY
from fl_sim.base.atomic import write_text
from fl_sim.leakage.metrics import METRICS, SCORES
from fl_sim.report import tables
from fl_sim.report.images import Picture, RoundImages, file_slug, round_images, truth_and_reconstruction
from fl_sim.report.inversion import InversionBlock, inversion_blocks
from fl_sim.report.plots import attack_colors, leakage_over_rounds
from fl_sim.report.render import render_html, render_markdown
from fl_sim.report.runs import RunData, load_run
from fl_sim.report.summary import scenario_facts, timing_facts
from fl_sim.report.tables import DEFAULT_RULE, DEFAULT_RULE_WHY, RecoveryRule, fmt, label
from fl_sim.scenario import Assumptions, ComponentSpec, assumptions
from fl_sim.store import ReportFiles, RunLayout

log = logging.getLogger("fl_sim")
FILES = ReportFiles.FIGURES
MAX_GRID_ROUNDS = 12  # rounds with image grids in the report; more are spread evenly (all are in grids/)


@dataclass
class RunSection:
    """What the report shows of one run."""

    run: RunData
    facts: list[tuple[str, str]]
    cases: list[dict[str, Any]] = field(default_factory=list)  # best / median / worst with pictures
    rounds: list[RoundImages] = field(default_factory=list)
    grid_note: str = ""
    captions: dict[tuple[int, str, int], str] = field(default_factory=dict)  # (round, attack, client) → scores
    badges: dict[tuple[int, str, int], str] = field(default_factory=dict)  # best / worst of a round
    failures: dict[tuple[int, str, int], str] = field(default_factory=dict)
    round_attacks: dict[int, list[str]] = field(default_factory=dict)  # the attacks that ran in a round
    inversions: list[InversionBlock] = field(default_factory=list)  # model attacks (TLDR)


def build_report(run_dirs: list[Path], out: Path | None = None, rule: RecoveryRule = DEFAULT_RULE) -> Path:
    """Write the report; returns the path of report.html. One run: into its folder unless ``out``."""
    runs = _unique_names([load_run(Path(d)) for d in run_dirs])
    if out is None:
        out = runs[0].root if len(runs) == 1 else Path(runs[0].root.parent /
                                                           f"report-{datetime.now():%Y%m%d-%H%M%S}")
    out = Path(out)
    results = pd.concat([r.results for r in runs], ignore_index=True)
    recs = tables.reconstructions(results)
    unavailable = tables.unavailable(results)
    colors = attack_colors(list(recs["attack"]) + [a.shown for r in runs for a in r.scenario.attacks])
    stats = tables.by_round(recs)
    rank = tables.rank_score(recs, rule)
    cases = tables.cases(recs, rank) if rank else pd.DataFrame()
    multi = len(runs) > 1
    assumed = {r.name: _assumptions(r, recs[recs["run"] == r.name]) for r in runs}

    figure = Picture(f"{FILES}/leakage-over-rounds.png",
                     leakage_over_rounds(stats, {r.name: r.metrics for r in runs}, colors, unavailable),
                     "leakage per round for each attack, and the global model's test accuracy")
    sections = [_section(r, recs[recs["run"] == r.name], cases, rank, multi) for r in runs]
    context = {
        "title": "fl-sim leakage report" + (f": {runs[0].name}" if not multi else f" ({len(runs)} runs)"),
        "generated": datetime.now().isoformat(timespec="seconds"),
        "multi": multi, "sections": sections, "colors": colors, "figure": figure,
        "rule": str(rule), "rule_why": DEFAULT_RULE_WHY if rule == DEFAULT_RULE else "",
        "rank": label(rank) if rank else None,
        "unavailable": {label(s): why for s, why in unavailable.items()},
        "provenance": {label(s): what for s, what in tables.provenance(results).items()},
        "headline": _headline_table(recs, cases, rule, rank, multi),
        "cases": _cases_table(cases, unavailable, multi),
        "by_round": _by_round_table(stats, unavailable, assumed, multi),
        "threat": _threat_table(assumed, multi),
        "utility": _utility_table(runs, multi),
        "privacy": _privacy_table(runs, multi), "privacy_worst": _privacy_worst(runs), "adversary": ADVERSARY,
        "has_attacks": not recs.empty,
        "has_inversions": any(s.inversions for s in sections),
    }
    pictures = [figure] + [p for s in sections for p in _section_pictures(s)]
    out.mkdir(parents=True, exist_ok=True)
    files = ReportFiles(out)
    (out / FILES).mkdir(exist_ok=True)
    for picture in pictures:
        (out / picture.file).write_bytes(picture.png)
    _write_data(files, runs, recs, stats, context, multi)
    write_text(files.markdown, render_markdown(context))
    write_text(files.html, render_html(context))
    return files.html


def report_after_run(root: Path) -> Path | None:
    """The report a run writes when it ends; a report that fails is logged, never fails the run."""
    try:
        return build_report([root])
    except Exception:  # noqa: BLE001 - the run's data is already safe on disk
        log.exception("the report could not be built; rebuild it with: fl-sim report %s", root)
        return None


def _unique_names(runs: list[RunData]) -> list[RunData]:
    """Runs with the same folder name (from different parents) are told apart by their parent folder."""
    names = [r.name for r in runs]
    if len(set(names)) == len(names):
        return runs
    renamed = []
    for i, r in enumerate(runs):
        name = f"{r.root.parent.name}/{r.name}" if names.count(r.name) > 1 else r.name
        name = name if name not in [x.name for x in renamed] else f"{name}#{i + 1}"
        renamed.append(RunData(r.root, name, r.scenario, r.state, r.metrics, r.results.assign(run=name), r.privacy))
    return renamed


def _section(run: RunData, recs: pd.DataFrame, cases: pd.DataFrame, rank: str | None, multi: bool) -> RunSection:
    section = RunSection(run, timing_facts(run, recs) + scenario_facts(run.scenario))
    prefix = f"{FILES}/{file_slug(run.name)}-" if multi else f"{FILES}/"
    section.round_attacks = {r: sorted(set(g["attack"])) for r, g in recs.groupby("round")}
    for row in recs.itertuples(index=False):
        key = (row.round, row.attack, row.client)
        if row.failed:
            section.failures[key] = row.failure or "failed"
        else:
            section.captions[key] = _caption(row._asdict())
    if rank:  # best / worst of each attack within each round (when it attacked several clients)
        for (_, attack), group in recs[recs[rank].notna()].groupby(["round", "attack"]):
            if len(group) > 1:
                ordered = group.sort_values(rank, ascending=not tables.higher_is_better(rank), kind="stable")
                section.badges[(ordered.iloc[0]["round"], attack, ordered.iloc[0]["client"])] = "best"
                section.badges[(ordered.iloc[-1]["round"], attack, ordered.iloc[-1]["client"])] = "worst"
    if not cases.empty:
        for case in cases[cases["run"] == run.name].to_dict("records"):
            file = f"{prefix}{case['attack']}-{case['case']}.png"
            picture = truth_and_reconstruction(run.root, int(case["round"]), case["attack"], int(case["client"]), file)
            section.cases.append(case | {"picture": picture, "caption": _caption(case)})
    rounds = sorted(set(recs["round"]))
    shown = _spread(rounds, MAX_GRID_ROUNDS)
    if len(shown) < len(rounds):
        section.grid_note = (f"{len(shown)} of {len(rounds)} attacked rounds shown (evenly spread); every round's "
                             f"grid is in {RunLayout(run.root).grids}.")
    section.rounds = [g for g in (round_images(run.root, r, prefix) for r in shown) if g is not None]
    section.inversions = inversion_blocks(run, prefix)
    return section


def _section_pictures(section: RunSection) -> list[Picture]:
    """The pictures report.md links to (report.html embeds its own)."""
    return ([c["picture"] for c in section.cases if c["picture"] is not None] + [g.overview for g in section.rounds]
            + [b.picture for b in section.inversions if b.picture is not None])


def _caption(row: dict[str, Any]) -> str:
    captions = [(s, METRICS.get(s).caption) for s in SCORES if METRICS.get(s).caption]
    return " · ".join(text.format(fmt(s, row[s])) for s, text in captions if s in row and not _nan(row[s]))


def _headline_table(recs: pd.DataFrame, cases: pd.DataFrame, rule: RecoveryRule, rank: str | None,
                    multi: bool) -> pd.DataFrame:
    rows = []
    table = tables.headline(recs, rule)
    has_baseline = bool(table["baseline_median"].notna().any())
    recovered = f"recovered ({rule}{', above baseline' if has_baseline else ''})"
    for h in table.to_dict("records"):
        row = {"run": h["run"], "attack": h["attack"], "attacked (round × client)": h["attacked"],
               "failed": h["failed"]}
        if _nan(h["recovered"]):
            row[recovered] = f"n/a ({rule.metric} not scored)"
            row["clients recovered"] = "n/a"
        else:
            row[recovered] = f"{h['recovered']} / {h['attacked']} ({h['recovered_fraction']:.0%})"
            row["clients recovered"] = f"{h['clients_recovered']} / {h['clients']}"
        if has_baseline:
            row["prior-only baseline (median, best)"] = (f"{fmt(rule.metric, h['baseline_median'])}, "
                                                         f"{fmt(rule.metric, h['baseline_extreme'])}")
            row["margin over baseline (median; > 0 better)"] = (
                "–" if _nan(h["margin_median"]) else f"{h['margin_median']:+.3g}")
        for case in ("best", "median", "worst"):
            match = cases[(cases["run"] == h["run"]) & (cases["attack"] == h["attack"]) & (cases["case"] == case)] \
                if not cases.empty else cases
            row[case] = "–" if match.empty or rank is None else (
                f"{fmt(rank, match.iloc[0][rank])} (round {match.iloc[0]['round']}, client {match.iloc[0]['client']})")
        rows.append(row)
    return _drop_run(pd.DataFrame(rows), multi)


def _cases_table(cases: pd.DataFrame, unavailable: dict[str, str], multi: bool) -> pd.DataFrame:
    if cases.empty:
        return cases
    frame = cases[["run", "attack", "case", "round", "client"]].copy()
    for score in SCORES:
        frame[label(score)] = [_cell(score, v, unavailable) for v in cases[score]]
    return _drop_run(frame, multi)


def _assumptions(run: RunData, recs: pd.DataFrame) -> dict[str, Assumptions]:
    """attack → its assumptions in this run: the scenario's attacks, and those appended later (``fl-sim attack``,
    taken with their preset's values)."""
    specs = list(run.scenario.attacks)
    specs += [ComponentSpec(name=a) for a in sorted(set(recs["attack"]) - {s.shown for s in specs})]
    return {a.attack: a for a in assumptions(run.scenario, specs)}


def _threat_table(assumed: dict[str, dict[str, Assumptions]], multi: bool) -> pd.DataFrame:
    """Per run and attack: the capabilities it read and the settings that make its figures an upper bound."""
    rows = []
    for run, by_attack in assumed.items():
        for a in by_attack.values():
            bounds = [why if rounds is None else f"{why} (round{'s' if len(rounds) > 1 else ''} "
                      f"{', '.join(map(str, rounds))})" for why, rounds in a.upper_bound.items()]
            rows.append({"run": run, "attack": a.attack, "capabilities used": ", ".join(a.capabilities),
                         "upper-bound settings": "; ".join(bounds) or "none (realistic)"})
    return _drop_run(pd.DataFrame(rows), multi)


def _by_round_table(stats: pd.DataFrame, unavailable: dict[str, str], assumed: dict[str, dict[str, Assumptions]],
                    multi: bool) -> pd.DataFrame:
    if stats.empty:
        return pd.DataFrame()
    rows = []
    for (run, attack, rnd), group in stats.groupby(["run", "attack", "round"]):
        first = group.iloc[0]
        mine = assumed.get(run, {}).get(attack)
        row = {"run": run, "round": rnd, "attack": attack, "clients": int(first["n"] + first["failed"]),
               "failed": int(first["failed"]),
               "upper bound": "; ".join(mine.reasons(int(rnd))) if mine is not None else ""}
        by_score = group.set_index("score")
        for score in SCORES:
            if score in by_score.index:
                s = by_score.loc[score]
                spread = "" if _nan(s["std"]) else f" ± {fmt(score, s['std'])}"
                prior = "" if _nan(s["baseline"]) else f"; prior only {fmt(score, s['baseline'])}"
                row[label(score)] = (f"{fmt(score, s['mean'])}{spread} "
                                     f"[{fmt(score, s['min'])}, {fmt(score, s['max'])}]{prior}")
            elif score in unavailable:
                row[label(score)] = "unavailable"
        rows.append(row)
    return _drop_run(pd.DataFrame(rows).sort_values(["run", "round", "attack"]), multi)


def _utility_table(runs: list[RunData], multi: bool) -> pd.DataFrame:
    rows = []
    for r in runs:
        for m in r.metrics.to_dict("records"):
            rows.append({"run": r.name, "round": m["round"], "test accuracy (%)": _pct(m["test_acc"]),
                         "test loss": _num(m["test_loss"]), "train loss": _num(m["train_loss"]),
                         "client eval accuracy (%)": _pct(m["eval_acc"]), "clients": m["clients"],
                         "failed clients": m["failures"], "round time (s)": _num(m["round_seconds"], ".2f")})
    return _drop_run(pd.DataFrame(rows), multi)


def _privacy_table(runs: list[RunData], multi: bool) -> pd.DataFrame | None:
    """Per run, defense and participations: the budget (the same for every client with that many rounds)."""
    frames = [r.privacy.assign(run=r.name) for r in runs if not r.privacy.empty]
    if not frames:
        return None
    keys = ["run", "defense", "level", "participations", "epsilon", "delta", "accountant", "adjacency"]
    table = pd.concat(frames).groupby(keys, sort=True).size().reset_index(name="clients")
    table["ε"] = [tables.fmt_epsilon(e) for e in table["epsilon"]]
    table["δ"] = [f"{d:.2g}" for d in table["delta"]]
    columns = ["run", "defense", "level", "participations", "clients", "ε", "δ", "adjacency", "accountant"]
    return _drop_run(table[columns], multi)


def _privacy_worst(runs: list[RunData]) -> list[str]:
    lines = []
    for r in runs:
        if r.privacy.empty:
            continue
        per_client = r.client_epsilon()
        client = int(per_client.idxmax())
        rounds = int(r.privacy.loc[r.privacy["client"] == client, "participations"].max())
        lines.append(f"{r.name}: worst case ε = {tables.fmt_epsilon(per_client.max())} (client {client}, {rounds} "
                     f"rounds; several defenses' ε add up), median {tables.fmt_epsilon(per_client.median())}.")
    return lines


def _write_data(files: ReportFiles, runs: list[RunData], recs: pd.DataFrame, stats: pd.DataFrame,
                context: dict[str, Any], multi: bool) -> None:
    """The report's data beside it: per-round statistics, headline, and (several runs) the merged rows."""
    stats.to_csv(files.table("leakage_by_round"), index=False)
    context["headline"].to_csv(files.table("headline"), index=False)
    recs.drop(columns=["failure"]).to_csv(files.table("reconstructions"), index=False)
    if multi:
        pd.concat([r.results for r in runs]).to_csv(files.table("results"), index=False)
        pd.concat([r.metrics.assign(run=r.name) for r in runs]).to_csv(files.table("metrics"), index=False)


def _spread(values: list[int], limit: int) -> list[int]:
    if len(values) <= limit:
        return values
    picks = np.unique(np.linspace(0, len(values) - 1, limit).round().astype(int))
    return [values[i] for i in picks]


def _drop_run(frame: pd.DataFrame, multi: bool) -> pd.DataFrame:
    return frame if multi or "run" not in frame else frame.drop(columns="run")


def _cell(score: str, value: float, unavailable: dict[str, str]) -> str:
    return "unavailable" if _nan(value) and score in unavailable else fmt(score, value)


def _pct(value: Any) -> str:
    return "–" if _nan(value) else f"{100 * float(value):.1f}"


def _num(value: Any, spec: str = ".4g") -> str:
    return "–" if _nan(value) else format(float(value), spec)


def _nan(value: Any) -> bool:
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return False

