"""Queries over tidy leakage rows: one row per reconstruction, per-round statistics, the headline.

A *reconstruction* is one attack on one client in one round (a whole batch, scored as the mean over
its one-to-one paired images); :func:`images` has each of its ground-truth images with its own scores. Rows
of every table carry the run name, so several runs stack.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

import pandas as pd

from fl_sim.base.errors import UserInputError
from fl_sim.leakage.metrics import METRICS, SCORES
from fl_sim.leakage.scoring import BASELINE

KEYS = ["run", "round", "client", "attack"]


def label(score: str) -> str:
    """Axis / column label with unit."""
    return METRICS.get(score).label


def higher_is_better(score: str) -> bool:
    return METRICS.get(score).higher_is_better


def fmt_epsilon(value: float | None) -> str:
    """A privacy budget as the tables print it: –, ∞ or 3 significant digits."""
    if value is None or math.isnan(value):
        return "–"
    return "∞" if math.isinf(value) else f"{value:.3g}"


def fmt(score: str, value: float) -> str:
    """A score (or ``seconds``) as the tables print it."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, ".2f" if score == "seconds" else METRICS.get(score).spec)


@dataclass(frozen=True)
class RecoveryRule:
    """When a reconstruction counts as recognisably recovered, e.g. ``ssim>=0.5``."""

    metric: str
    op: str  # ">=" or "<="
    value: float

    @classmethod
    def parse(cls, text: str) -> RecoveryRule:
        match = re.fullmatch(r"\s*([a-z_]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*", text)
        if not match or match.group(1) not in SCORES:
            raise UserInputError(f"--recovered '{text}': expected METRIC>=VALUE or METRIC<=VALUE with METRIC one of: "
                                 f"{', '.join(SCORES)}")
        return cls(match.group(1), match.group(2), float(match.group(3)))

    def __str__(self) -> str:
        return f"{label(self.metric)} {'≥' if self.op == '>=' else '≤'} {self.value:g}"

    def holds(self, values: pd.Series) -> pd.Series:
        return {">=": operator.ge, "<=": operator.le}[self.op](values, self.value).fillna(False)


DEFAULT_RULE = RecoveryRule("ssim", ">=", 0.5)
DEFAULT_RULE_WHY = (
    "SSIM is bounded (1 = identical, about 0 = unrelated), comparable across datasets and image sizes (PSNR and MSE "
    "depend on the image content), and computed offline (LPIPS needs AlexNet weights); at 0.5 the object's edges and "
    "layout are visibly preserved. A failed attack counts as not recovered. Change the rule with "
    "fl-sim report --recovered, e.g. 'psnr>=20' or 'avd<=0.3'.")


def batch_rows(results: pd.DataFrame) -> pd.DataFrame:
    """The rows of whole reconstructions (their batch means), without the per-image rows."""
    return results[results["image"].isna()] if "image" in results else results


def reconstructions(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, round, client, attack): a column per score, ``failed`` (bool) and ``failure`` (reason)."""
    results = batch_rows(results)
    if results.empty:
        return pd.DataFrame(columns=[*KEYS, "failed", "failure", *SCORES])
    wide = results.groupby([*KEYS, "metric"])["value"].mean().unstack("metric").reset_index()
    notes = results[results["metric"] == "failed"].groupby(KEYS)["note"].first()
    wide["failure"] = [notes.get(tuple(k), "") for k in wide[KEYS].itertuples(index=False)]
    wide["failed"] = wide.get("failed", 0).fillna(0).astype(float) > 0
    for score in SCORES:
        if score not in wide:
            wide[score] = math.nan
    return wide.sort_values(KEYS).reset_index(drop=True)


def unavailable(results: pd.DataFrame) -> dict[str, str]:
    """score → the reason it could not be computed (first ``unavailable: ...`` note)."""
    notes = results[results["note"].str.startswith("unavailable:") & ~results["metric"].str.startswith(BASELINE)]
    return {m: n.removeprefix("unavailable:").strip() for m, n in notes.groupby("metric")["note"].first().items()}


def provenance(results: pd.DataFrame) -> dict[str, str]:
    """score → what its values rest on, from the rows' ``backbone: ...`` notes (LPIPS), every distinct one."""
    notes = results[results["note"].str.startswith("backbone:") & ~results["metric"].str.startswith(BASELINE)]
    return {m: "; ".join(sorted({n.removeprefix("backbone:").strip() for n in group}))
            for m, group in notes.groupby("metric")["note"]}


def scored(recs: pd.DataFrame) -> list[str]:
    """Scores with at least one value, in report order."""
    return [s for s in SCORES if s in recs and recs[s].notna().any()]


def baseline(recs: pd.DataFrame, score: str) -> pd.Series:
    """Each reconstruction's prior-only baseline for ``score`` (NaN where none ran)."""
    column = f"{BASELINE}{score}"
    return recs[column] if column in recs else pd.Series(math.nan, index=recs.index)


def by_round(recs: pd.DataFrame) -> pd.DataFrame:
    """Per (run, attack, round, score): mean, std, min, max over the attacked clients, n scored, failed count, and
    the mean prior-only baseline."""
    frames = []
    for score in scored(recs):
        grouped = recs.assign(_baseline=baseline(recs, score)).groupby(["run", "attack", "round"])
        stats = grouped[score].agg(["mean", "std", "min", "max", "count"]).rename(columns={"count": "n"})
        stats["failed"] = grouped["failed"].sum()
        stats["baseline"] = grouped["_baseline"].mean()
        frames.append(stats.reset_index().assign(score=score))
    columns = ["run", "attack", "round", "score", "mean", "std", "min", "max", "n", "failed", "baseline"]
    return pd.concat(frames)[columns] if frames else pd.DataFrame(columns=columns)


def margin(recs: pd.DataFrame, score: str) -> pd.Series:
    """How much better than its own prior-only baseline each reconstruction scores (> 0: better, whichever
    direction ``score`` improves in)."""
    diff = recs[score] - baseline(recs, score)
    return diff if higher_is_better(score) else -diff


def above_baseline(group: pd.DataFrame, score: str) -> pd.Series:
    """Whether each reconstruction's ``score`` is beyond every prior-only baseline of its run and attack (the
    baseline's whole distribution); True where no baseline ran."""
    reference = baseline(group, score).dropna()
    if reference.empty:
        return pd.Series(True, index=group.index)
    if higher_is_better(score):
        return (group[score] > reference.max()).fillna(False)
    return (group[score] < reference.min()).fillna(False)


def rank_score(recs: pd.DataFrame, rule: RecoveryRule) -> str | None:
    """The score that orders reconstructions best → worst: the rule's, else the first scored image metric."""
    available = [s for s in scored(recs) if s != "label_acc"]
    return rule.metric if rule.metric in scored(recs) else (available[0] if available else None)


def cases(recs: pd.DataFrame, rank: str) -> pd.DataFrame:
    """Per (run, attack): the best, median and worst scored reconstruction by ``rank`` (column ``case``)."""
    picked = []
    for _, group in recs[recs[rank].notna()].groupby(["run", "attack"]):
        ordered = group.sort_values(rank, ascending=not higher_is_better(rank), kind="stable")
        for case, index in (("best", 0), ("median", (len(ordered) - 1) // 2), ("worst", len(ordered) - 1)):
            picked.append(ordered.iloc[index].to_dict() | {"case": case})
    return pd.DataFrame(picked)


def headline(recs: pd.DataFrame, rule: RecoveryRule) -> pd.DataFrame:
    """Per (run, attack): attacked reconstructions, failures, recovered (the rule holds *and* the score is beyond
    every prior-only baseline), clients ever recovered, and the rule metric's baseline median / extreme and the
    median margin of the reconstructions over their baselines."""
    rows = []
    scored_runs = set(recs.loc[recs[rule.metric].notna(), "run"]) if rule.metric in recs else set()
    for (run, attack), group in recs.groupby(["run", "attack"]):
        row = {"run": run, "attack": attack, "attacked": len(group), "failed": int(group["failed"].sum()),
               "clients": group["client"].nunique()}
        if run not in scored_runs:  # the run did not score the rule's metric at all
            row |= {"recovered": math.nan, "recovered_fraction": math.nan, "clients_recovered": math.nan}
        else:
            ok = rule.holds(group[rule.metric]) & ~group["failed"] & above_baseline(group, rule.metric)
            row |= {"recovered": int(ok.sum()), "recovered_fraction": float(ok.mean()),
                    "clients_recovered": group.loc[ok, "client"].nunique()}
        if rule.metric in group:
            base = baseline(group, rule.metric)
            row |= {"baseline_median": float(base.median()), "baseline_extreme": float(
                        base.max() if higher_is_better(rule.metric) else base.min()),
                    "margin_median": float(margin(group, rule.metric).median())}
        rows.append(row)
    columns = ["run", "attack", "attacked", "failed", "clients", "recovered", "recovered_fraction", "clients_recovered",
               "baseline_median", "baseline_extreme", "margin_median"]
    return pd.DataFrame(rows, columns=columns)


def images(results: pd.DataFrame) -> pd.DataFrame:
    """One row per (run, round, client, attack, image): that ground-truth image's scores and its prior-only
    baselines' (``baseline_<score>``), NaN where its attack failed or paired no image with it. Empty for runs
    written before per-image rows existed."""
    rows = results[results["image"].notna()] if "image" in results else results.iloc[:0]
    if rows.empty:
        return pd.DataFrame(columns=[*KEYS, "image"])
    rows = rows.assign(image=rows["image"].astype(int))
    return (rows.groupby([*KEYS, "image", "metric"])["value"].mean().unstack("metric").reset_index()
            .sort_values([*KEYS, "image"]).reset_index(drop=True))


def image_success(imgs: pd.DataFrame, rule: RecoveryRule, baseline_rows: bool = False) -> pd.Series:
    """Whether ``rule`` holds for each image's score (``baseline_rows``: for its prior-only baseline's score
    instead); NaN scores (failed, unpaired) do not."""
    column = f"{BASELINE}{rule.metric}" if baseline_rows else rule.metric
    return rule.holds(imgs[column]) if column in imgs else pd.Series(False, index=imgs.index)


def images_recovered(imgs: pd.DataFrame, rule: RecoveryRule) -> pd.Series:
    """The headline's "recovered" per image: the rule holds and the image's score is beyond every prior-only
    baseline image score of its run and attack."""
    ok = pd.Series(False, index=imgs.index)
    for _, group in imgs.groupby(["run", "attack"]):
        ok[group.index] = image_success(group, rule) & above_baseline(group, rule.metric)
    return ok
