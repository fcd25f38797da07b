"""RunStore: one run folder, written incrementally so a run killed mid-way keeps its finished rounds.

runs/<scenario>-<time>/
  scenario.toml      the resolved scenario (what --resume reloads)
  run.json           status, start / end time, last finished round
  metrics.csv        per round: test accuracy/loss, train loss, client evaluation, timings
  results.csv        tidy leakage rows: run, round, client, attack, defense, metric, value
  inversion.csv      model attacks (TLDR): run, round, attack, class, metric, value, note (fl_sim.inversion)
  observations/      round-RRRR/global.safetensors + client-CCCC.{safetensors,json}
  secrets/           round-RRRR.json (simulation-only ground truth for scoring)
  checkpoint.safetensors  global model after the last finished round
  run.log
  report.html, report.md, ...   written by fl_sim.report when the run ends
"""

from __future__ import annotations

import csv
import json
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import tomli_w
import torch
from safetensors.torch import load_file

from fl_sim.atomic import atomic_path, save_tensors, write_text
from fl_sim.errors import UserInputError
from fl_sim.observation import save_global_state, save_observation
from fl_sim.scenario import Scenario, load_scenario
from fl_sim.secret import SecretLedger
from fl_sim.strategy import RoundRecord

RESULT_COLUMNS = ["run", "round", "client", "attack", "defense", "metric", "value", "label_strategy", "note"]
INVERSION_COLUMNS = ["run", "round", "attack", "class", "metric", "value", "note"]
METRIC_COLUMNS = ["round", "test_loss", "test_acc", "train_loss", "eval_loss", "eval_acc", "clients", "failures",
                  "round_seconds", "record_seconds"]


class RunStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.secrets = SecretLedger(self.root)
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
        (root / "scenario.toml").write_text(tomli_w.dumps(scenario.to_toml_dict()))
        for name, columns in (("results.csv", RESULT_COLUMNS), ("metrics.csv", METRIC_COLUMNS)):
            with open(root / name, "w", newline="") as f:
                csv.writer(f).writerow(columns)
        store._write_state({"name": root.name, "status": "running", "last_round": 0,
                            "rounds": scenario.federation.rounds,
                            "started": datetime.now().isoformat(timespec="milliseconds")})
        return store

    @classmethod
    def open(cls, root: Path, arg: str = "RUN_DIR") -> RunStore:
        """An existing run folder; ``arg`` names the command-line argument in the error."""
        root = Path(root)
        if not (root / "run.json").is_file() or not (root / "scenario.toml").is_file():
            raise UserInputError(f"{arg} '{root}' is not an fl-sim run folder (no run.json / scenario.toml)")
        return cls(root)

    def scenario(self) -> Scenario:
        return load_scenario(self.root / "scenario.toml")

    # --- state ----------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return json.loads((self.root / "run.json").read_text())

    def _write_state(self, state: dict[str, Any]) -> None:
        write_text(self.root / "run.json", json.dumps(state, indent=1))

    def update_state(self, **changes: Any) -> None:
        self._write_state(self.state() | changes)

    def end(self, status: str) -> None:
        """Record how the run ended (finished / incomplete / interrupted / failed) and when."""
        self.update_state(status=status, ended=datetime.now().isoformat(timespec="milliseconds"))

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def last_round(self) -> int:
        return int(self.state()["last_round"])

    def checkpoint(self) -> dict[str, torch.Tensor] | None:
        path = self.root / "checkpoint.safetensors"
        return load_file(str(path)) if path.exists() and self.last_round > 0 else None

    def discard_unfinished(self) -> None:
        """Drop what a killed run wrote for the round it did not finish."""
        last = self.last_round
        for parent in ("observations", "reconstructions", "inversions"):
            for folder in (self.root / parent).glob("round-*"):
                if int(folder.name.split("-")[1]) > last:
                    shutil.rmtree(folder)
        for grid in (self.root / "grids").glob("*round-*.png"):
            if int(grid.stem.split("round-")[1].split("-")[0]) > last:
                grid.unlink()
        self.secrets.discard_after(last)
        for table in ("results.csv", "inversion.csv"):
            _keep_rounds(self.root / table, last)

    # --- per round ------------------------------------------------------------------------------------
    def record_round(self, record: RoundRecord) -> None:
        """Persist the round's Observations (and, apart, its Secrets) as soon as the server has them."""
        t0 = time.perf_counter()
        if record.observations:
            save_global_state(self.root, record.server_round, record.global_state)
        for obs in record.observations:
            save_observation(self.root, obs)
        for secret in record.secrets:
            self.secrets.add(secret)
        self.record_seconds += time.perf_counter() - t0

    def finish_round(self, server_round: int, state: dict[str, torch.Tensor], metrics: dict[str, Any]) -> None:
        """Checkpoint + metrics row + last_round: after this the round survives a crash."""
        save_tensors(state, self.root / "checkpoint.safetensors")
        with open(self.root / "metrics.csv", "a", newline="") as f:
            csv.DictWriter(f, METRIC_COLUMNS).writerow({"round": server_round} | metrics)
        self.update_state(last_round=server_round)

    def append_inversions(self, rows: list[dict[str, Any]]) -> None:
        """Model-attack rows (fl_sim.inversion) → inversion.csv, created with its header on first use."""
        path = self.root / "inversion.csv"
        new = not path.exists()
        with open(path, "a", newline="") as f:
            writer = csv.DictWriter(f, INVERSION_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerows({"run": self.name} | row for row in rows)

    def append_results(self, rows: list[dict[str, Any]]) -> None:
        with open(self.root / "results.csv", "a", newline="") as f:
            csv.DictWriter(f, RESULT_COLUMNS, extrasaction="ignore").writerows(
                {"run": self.name} | row for row in rows)


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
