"""``fl-sim compare``: one federation and attack set under each defense setting, then one comparison report.

Every setting runs the same scenario (same seeds, so the same sampled clients and client batches)
with its defenses replaced by the setting's, into ``OUT/runs/NN-<label>/`` — a complete run folder
with its own report. The comparison lands in ``OUT/comparison.html`` / ``.md`` / ``.csv``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

from defenses import defense_label
from fl_sim.scenario import ComponentSpec, Scenario, expand_grid

log = logging.getLogger("fl_sim")
Runner = Callable[[Scenario, Path], None]  # runs one scenario into a new run folder


def settings(scenario: Scenario) -> list[list[ComponentSpec]]:
    """The defense lists to compare: [] (no defense) first if ``compare.baseline``, then the grid."""
    grid = [[s] for spec in scenario.compare.defenses for s in expand_grid(spec)]
    return ([[]] if scenario.compare.baseline else []) + grid


def setting_dir(out: Path, index: int, defenses: list[ComponentSpec]) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.=_-]+", "-", defense_label(defenses)).strip("-")
    return Path(out) / "runs" / f"{index:02d}-{slug}"


def run_comparison(scenario: Scenario, out: Path, run: Runner) -> list[Path]:
    """Run every setting (skipping folders that already finished, so an interrupted comparison resumes)."""
    folders = []
    for i, defenses in enumerate(settings(scenario)):
        folder = setting_dir(out, i, defenses)
        folders.append(folder)
        if (folder / "run.json").is_file() and '"finished"' in (folder / "run.json").read_text():
            log.info("%s: finished earlier, kept", folder.name)
            continue
        run(scenario.model_copy(update={"defenses": defenses, "name": f"{scenario.name}-{folder.name}"}), folder)
    return folders
