"""A run folder as the report reads it: scenario, state, per-round metrics and tidy leakage rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd

from fl_sim.report.tables import images
from fl_sim.scenario import Scenario
from fl_sim.store import METRIC_COLUMNS, PRIVACY_COLUMNS, RESULT_COLUMNS, RunStore


@dataclass(frozen=True)
class RunData:
    root: Path
    name: str
    scenario: Scenario
    state: dict[str, Any]
    metrics: pd.DataFrame  # one row per finished round (METRIC_COLUMNS)
    results: pd.DataFrame  # tidy leakage rows of finished rounds (RESULT_COLUMNS, value numeric)
    privacy: pd.DataFrame  # each client's budget against the curious server (PRIVACY_COLUMNS; empty without DP)

    @cached_property
    def images(self) -> pd.DataFrame:
        """Each attacked ground-truth image with its own scores (:func:`fl_sim.report.tables.images`), pivoted once."""
        return images(self.results)

    def client_epsilon(self) -> pd.Series:
        """client → its ε against the curious server (its defenses' ε summed: basic composition); empty without DP."""
        return self.privacy.groupby("client")["epsilon"].sum()

    def worst_epsilon(self) -> float | None:
        """The largest ε any client has, None without DP."""
        return None if self.privacy.empty else float(self.client_epsilon().max())

    @property
    def last_round(self) -> int:
        return int(self.state.get("last_round", 0))

    @property
    def rounds(self) -> int:
        return int(self.state.get("rounds", self.scenario.federation.rounds))

    @property
    def partial(self) -> bool:
        return self.last_round < self.rounds

    def duration_seconds(self) -> float | None:
        """Wall time from run.json's start to its end (or last update for an unfinished run)."""
        start, end = self.state.get("started"), self.state.get("ended")
        if not start or not end:
            return None
        return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def load_run(root: Path) -> RunData:
    """Read a run folder, finished or not; rows of a round that did not finish are left out."""
    store = RunStore.open(root)
    root, layout, state = store.root, store.layout, store.state()
    last = int(state.get("last_round", 0))
    metrics = _read_csv(layout.metrics, METRIC_COLUMNS)
    metrics = metrics[metrics["round"] <= last].sort_values("round").reset_index(drop=True)
    results = _read_csv(layout.results, RESULT_COLUMNS)
    results = results[results["round"] <= last].reset_index(drop=True)
    results["run"] = root.name
    results["value"] = pd.to_numeric(results["value"], errors="coerce")
    for column in ("note", "label_strategy", "defense"):
        results[column] = results[column].astype(object).fillna("").astype(str)
    privacy = (pd.read_csv(layout.privacy) if layout.privacy.is_file() else pd.DataFrame(columns=PRIVACY_COLUMNS))
    return RunData(root, root.name, store.scenario(), state, metrics, results, privacy)


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    """A CSV the store wrote (possibly by an older version with fewer columns), or an empty frame."""
    frame = pd.read_csv(path) if path.is_file() and path.stat().st_size else pd.DataFrame(columns=columns)
    for column in columns:
        if column not in frame:
            frame[column] = pd.NA
    frame["round"] = pd.to_numeric(frame["round"], errors="coerce").fillna(0).astype(int)
    if "client" in frame:
        frame["client"] = pd.to_numeric(frame["client"], errors="coerce").fillna(-1).astype(int)
    return frame[columns]
