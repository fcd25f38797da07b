"""RunLayout: the one owner of a run folder's names. Every writer and reader asks it for paths, and names
are parsed back here only (round numbers, (attack, client) of a reconstruction).

    <run>/scenario.toml  run.json  metrics.csv  results.csv  inversion.csv  privacy.csv  checkpoint.safetensors  run.log
          observations/round-RRRR/global.safetensors + client-CCCC.{safetensors,json,features.safetensors}
          secrets/round-RRRR.json
          reconstructions/round-RRRR/<attack>-client-CCCC.safetensors
          inversions/round-RRRR/<attack>.safetensors
          grids/round-RRRR.png  grids/inversion-round-RRRR-<attack>.png
          report.html  report.md  report-files/  reconstructions.csv  leakage_by_round.csv  headline.csv
          deploy-logs/

Client −1 (a secure aggregate) is written ``client--001``. ``run.json`` records ``layout``
(:data:`LAYOUT_VERSION`); a folder without it was written by an fl-sim that used layout 1.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

LAYOUT_VERSION = 1
_ROUND = re.compile(r"round-(-?\d+)")


def _round_name(server_round: int) -> str:
    return f"round-{server_round:04d}"


def round_of(path: Path) -> int:
    """The round a per-round folder or file belongs to (``round-0003``, ``inversion-round-0003-tldr.png``)."""
    match = _ROUND.search(Path(path).name)
    if match is None:
        raise ValueError(f"{path} is not a per-round name")
    return int(match.group(1))


@dataclass(frozen=True)
class ReportFiles:
    """What ``fl-sim report`` writes into a folder (a run folder, or a folder for several runs)."""

    root: Path
    FIGURES: ClassVar[str] = "report-files"  # the figures' folder, relative to the report (report.md links to it)

    @property
    def html(self) -> Path:
        return self.root / "report.html"

    @property
    def markdown(self) -> Path:
        return self.root / "report.md"

    def table(self, name: str) -> Path:
        """``reconstructions``, ``leakage_by_round``, ``headline`` (and for several runs ``results``, ``metrics``)."""
        return self.root / f"{name}.csv"


@dataclass(frozen=True)
class RunLayout:
    root: Path

    # --- one file each -------------------------------------------------------------------------------
    @property
    def scenario(self) -> Path:
        return self.root / "scenario.toml"

    @property
    def state(self) -> Path:
        return self.root / "run.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def results(self) -> Path:
        return self.root / "results.csv"

    @property
    def inversion_rows(self) -> Path:
        return self.root / "inversion.csv"

    @property
    def privacy(self) -> Path:
        return self.root / "privacy.csv"

    @property
    def checkpoint(self) -> Path:
        return self.root / "checkpoint.safetensors"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def deploy_logs(self) -> Path:
        return self.root / "deploy-logs"

    @property
    def report(self) -> ReportFiles:
        return ReportFiles(self.root)

    # --- per round --------------------------------------------------------------------------------------
    def observations(self, server_round: int) -> Path:
        return self.root / "observations" / _round_name(server_round)

    def global_state(self, server_round: int) -> Path:
        return self.observations(server_round) / "global.safetensors"

    def observation(self, server_round: int, client: int, part: str = "") -> Path:
        """``part``: "" (the update), "json" (the rest) or "features" (shared features)."""
        suffix = {"": ".safetensors", "json": ".json", "features": ".features.safetensors"}[part]
        return self.observations(server_round) / f"client-{client:04d}{suffix}"

    def observation_clients(self, server_round: int) -> list[int]:
        """Clients with a saved observation in ``server_round``, ascending."""
        return sorted(int(p.name.removeprefix("client-").removesuffix(".json"))
                      for p in self.observations(server_round).glob("client-*.json"))

    def secrets(self, server_round: int) -> Path:
        return self.root / "secrets" / f"{_round_name(server_round)}.json"

    def reconstructions(self, server_round: int) -> Path:
        return self.root / "reconstructions" / _round_name(server_round)

    def reconstruction(self, server_round: int, attack: str, client: int) -> Path:
        return self.reconstructions(server_round) / f"{attack}-client-{client:04d}.safetensors"

    def reconstruction_files(self, server_round: int) -> dict[tuple[str, int], Path]:
        """(attack, client) → file, for every reconstruction saved in ``server_round``."""
        found = {}
        for path in sorted(self.reconstructions(server_round).glob("*-client-*.safetensors")):
            attack, client = path.name.removesuffix(".safetensors").rsplit("-client-", 1)
            found[(attack, int(client))] = path
        return found

    def inversions(self, server_round: int) -> Path:
        return self.root / "inversions" / _round_name(server_round)

    def inversion(self, server_round: int, attack: str) -> Path:
        return self.inversions(server_round) / f"{attack}.safetensors"

    @property
    def grids(self) -> Path:
        return self.root / "grids"

    def round_grid(self, server_round: int) -> Path:
        return self.grids / f"{_round_name(server_round)}.png"

    def inversion_grid(self, server_round: int, attack: str) -> Path:
        return self.grids / f"inversion-{_round_name(server_round)}-{attack}.png"

    # --- across rounds ----------------------------------------------------------------------------------
    def observed_rounds(self) -> list[int]:
        """Rounds with saved observations (their global state written), ascending."""
        return sorted(round_of(d) for d in (self.root / "observations").glob("round-*")
                      if (d / "global.safetensors").exists())

    def per_round(self) -> list[Path]:
        """Every per-round folder and file of the run (observations, secrets, reconstructions, inversions, grids)."""
        return [*(self.root / "observations").glob("round-*"), *(self.root / "secrets").glob("round-*.json"),
                *(self.root / "reconstructions").glob("round-*"), *(self.root / "inversions").glob("round-*"),
                *self.grids.glob("*round-*.png")]


@dataclass(frozen=True)
class ComparisonLayout:
    """``fl-sim compare``'s folder: one complete run folder per setting, then the comparison report."""

    root: Path
    FIGURES: ClassVar[str] = "comparison-files"  # the figures' folder, relative to the comparison report

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def setting(self, index: int, slug: str) -> Path:
        return self.runs / f"{index:02d}-{slug}"

    @property
    def html(self) -> Path:
        return self.root / "comparison.html"

    @property
    def markdown(self) -> Path:
        return self.root / "comparison.md"

    @property
    def table(self) -> Path:
        return self.root / "comparison.csv"
