"""``fl-sim compare``'s settings: one scenario under each defense setting of its ``[compare]`` grid.

Every setting runs the same scenario (same seeds, so the same sampled clients and client batches) with
its defenses replaced by the setting's; ``fl-sim compare`` runs each into its own run folder.
"""

from __future__ import annotations

import re

from defenses import defense_label
from fl_sim.scenario.loading import scenario_from_dict
from fl_sim.scenario.schema import ComponentSpec, Scenario, expand_grid


def settings(scenario: Scenario) -> list[list[ComponentSpec]]:
    """The defense lists to compare: [] (no defense) first if ``compare.baseline``, then the grid."""
    grid = [[s] for spec in scenario.compare.defenses for s in expand_grid(spec)]
    return ([[]] if scenario.compare.baseline else []) + grid


def setting_slug(defenses: list[ComponentSpec]) -> str:
    """A folder-name form of the setting's label."""
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", defense_label(defenses)).strip("-")


def setting_scenario(scenario: Scenario, defenses: list[ComponentSpec], folder_name: str) -> Scenario:
    """The scenario of one setting, validated as a scenario of its own (ScenarioError if it is not valid)."""
    return scenario_from_dict(scenario.to_toml_dict() | {"name": f"{scenario.name}-{folder_name}",
                                                         "defenses": [{"name": d.name, **d.params} for d in defenses]})
