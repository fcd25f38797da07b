"""RunStore: one run folder, written incrementally so a run killed mid-way keeps its finished rounds.

Where each file lives is :class:`fl_sim.store.layout.RunLayout`'s; what the store writes:

  scenario.toml      the resolved scenario (what --resume reloads)
  run.json           status, start / end time, last finished round, layout version, what later stages
                     need from the federation (class names, ε of the defenses), and the device the server
                     evaluated and attacked on (server_device: cpu, or cuda:0 with the GPU's name)
  metrics.csv        per round: test accuracy/loss, train loss, client evaluation, participants, timings
  results.csv        tidy leakage rows: run, round, client, attack, defense, metric, value, label_strategy, note,
                     image (empty: the batch's mean; else that ground-truth image's own score)
  inversion.csv      model attacks (TLDR): run, round, attack, class, metric, value, note
  privacy.csv        runs with a DP defense: each client's (ε, δ) against the curious server so far
  observations/      what the server saw, per round and client
  checkpoint.safetensors  global model after the last finished round
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors.torch import load_file

from fl_sim.base.atomic import atomic_path, save_tensors, write_text
from fl_sim.base.errors import UserInputError
from fl_sim.observation import Observation
from fl_sim.scenario import Scenario, load_scenario
from fl_sim.store.layout import LAYOUT_VERSION, RunLayout, round_of
from fl_sim.store.observations import save_global_state, save_observation

RESULT_COLUMNS = ["run", "round", "client", "attack", "defense", "metric", "value", "label_strategy", "note", "image"]
INVERSION_COLUMNS = ["run", "round", "attack", "class", "metric", "value", "note"]
PRIVACY_COLUMNS = ["client", "defense", "participations", "epsilon", "delta", "level", "adjacency", "adversary",
                   "accountant", "steps_per_round", "batch_rate"]  # the last two: the rest of defenses.Releases
METRIC_COLUMNS = ["round", "test_loss", "test_acc", "train_loss", "eval_loss", "eval_acc", "clients", "failures",
                  "round_seconds", "record_seconds"]


class RunStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.layout = RunLayout(self.root)
        self.record_seconds = 0.0  # time spent writing what the server observed

    # --- creation / reopening -------------------------------------------------------------------
    @staticmethod
    def default_dir(scenario: Scenario) -> Path:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path(scenario.output.dir) / f"{scenario.name}-{stamp}"

    @classmethod
    def create(cls, scenario: Scenario, out: Path | None = None) -> RunStore:
        root = Path(out) if out is not None else cls.default_dir(scenario)
        if root.exists() and any(root.iterdir()):
            raise UserInputError(f"--out '{root}' already exists and is not empty; choose a new folder or --resume it")
        root.mkdir(parents=True, exist_ok=True)
        store = cls(root)
        store.layout.scenario.write_text(tomli_w.dumps(scenario.to_toml_dict()))
        for path, columns in ((store.layout.results, RESULT_COLUMNS), (store.layout.metrics, METRIC_COLUMNS)):
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(columns)
        store._write_state({"name": root.name, "status": "running", "last_round": 0,
                            "rounds": scenario.federation.rounds, "layout": LAYOUT_VERSION,
                            "started": datetime.now().isoformat(timespec="milliseconds")})
        return store

    @classmethod
    def open(cls, root: Path, arg: str = "RUN_DIR") -> RunStore:
        """An existing run folder; ``arg`` names the command-line argument in the error."""
        layout = RunLayout(Path(root))
        if not layout.state.is_file() or not layout.scenario.is_file():
            raise UserInputError(f"{arg} '{root}' is not an fl-sim run folder (no run.json / scenario.toml)")
        version = int(json.loads(layout.state.read_text()).get("layout", 1))
        if version > LAYOUT_VERSION:
            raise UserInputError(f"{arg} '{root}' was written by a newer fl-sim (run folder layout {version}); "
                                 f"this version reads layouts up to {LAYOUT_VERSION}: upgrade fl-sim")
        return cls(layout.root)

    def scenario(self) -> Scenario:
        return load_scenario(self.layout.scenario)

    # --- state ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return json.loads(self.layout.state.read_text())

    def _write_state(self, state: dict[str, Any]) -> None:
        write_text(self.layout.state, json.dumps(state, indent=1))

    def update_state(self, **changes: Any) -> None:
        self._write_state(self.state() | changes)

    def end(self, status: str) -> None:
        """Record how the run ended (finished / incomplete / interrupted / failed) and when."""
        self.update_state(status=status, ended=datetime.now().isoformat(timespec="milliseconds"))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def status(self) -> str:
        return str(self.state().get("status", "unknown"))

    @property
    def last_round(self) -> int:
        return int(self.state()["last_round"])

    def checkpoint(self) -> dict[str, torch.Tensor] | None:
        path = self.layout.checkpoint
        return load_file(str(path)) if path.exists() and self.last_round > 0 else None

    def discard_unfinished(self) -> None:
        """Drop what a killed run wrote for the round it did not finish."""
        last = self.last_round
        for path in self.layout.per_round():
            if round_of(path) > last and path.is_dir():
                shutil.rmtree(path)
            elif round_of(path) > last:
                path.unlink()
        for table in (self.layout.results, self.layout.inversion_rows):
            _keep_rounds(table, last)

    # --- per round ------------------------------------------------------------------------------------
    def record_observations(self, server_round: int, global_state: dict[str, torch.Tensor],
                            observations: list[Observation]) -> None:
        """Persist a round's Observations as soon as the server has them."""
        t0 = time.perf_counter()
        if observations:
            save_global_state(self.layout, server_round, global_state)
        for obs in observations:
            save_observation(self.layout, obs)
        self.record_seconds += time.perf_counter() - t0

    def finish_round(self, server_round: int, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        """Checkpoint + metrics row + last_round: after this the round survives a crash."""
        save_tensors(state, self.layout.checkpoint)
        with open(self.layout.metrics, "a", newline="") as f:
            csv.DictWriter(f, METRIC_COLUMNS).writerow({"round": server_round} | metrics)
        self.update_state(last_round=server_round)

    def participation(self) -> Counter[int]:
        """client → rounds it was sampled in, over the finished rounds (metrics.csv's ``clients``)."""
        counts: Counter[int] = Counter()
        with open(self.layout.metrics, newline="") as f:
            for row in csv.DictReader(f):
                if int(row["round"]) <= self.last_round:
                    counts.update(int(c) for c in row["clients"].split())
        return counts

    def write_privacy(self, rows: list[dict[str, Any]]) -> None:
        """privacy.csv, rewritten whole (one row per client and accounted defense)."""
        with atomic_path(self.layout.privacy) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, PRIVACY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append_inversions(self, rows: list[dict[str, Any]]) -> None:
        """Model-attack rows → inversion.csv, created with its header on first use."""
        path = self.layout.inversion_rows
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, INVERSION_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({"run": self.name} | row for row in rows)

    def append_results(self, rows: list[dict[str, Any]]) -> None:
        """Rows → results.csv, in the columns of its header (a run resumed from an older fl-sim keeps its own)."""
        with open(self.layout.results, newline="") as f:
            columns = next(csv.reader(f), RESULT_COLUMNS)
        with open(self.layout.results, "a", newline="") as f:
            csv.DictWriter(f, columns, extrasaction="ignore").writerows({"run": self.name} | row for row in rows)


def _keep_rounds(path: Path, last: int) -> None:
    """Rewrite a tidy CSV without the rows of rounds after ``last`` (absent file: nothing to do)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        columns, rows = reader.fieldnames or [], list(reader)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(r for r in rows if int(r["round"]) <= last)
