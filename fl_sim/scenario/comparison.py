"""``fl-sim compare``'s settings: one scenario under each setting of its ``[compare]`` grids.

A setting is a defense list (none first if ``compare.baseline``, then every ``compare.defenses`` grid point)
crossed with one value of every ``compare.grid`` key. Every setting runs the same scenario (same seeds, so the
same sampled clients and client batch draws) with those keys and defenses replaced; ``fl-sim compare`` runs each
into its own run folder.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

from defenses import defense_label
from fl_sim.scenario.loading import scenario_from_dict
from fl_sim.scenario.schema import ComponentSpec, Scenario, expand_grid


@dataclass(frozen=True)
class CompareSetting:
    """One point of the comparison: its defenses and its values of the swept keys (key → value, grid order)."""

    defenses: list[ComponentSpec]
    values: tuple[tuple[str, Any], ...] = ()
    swept: frozenset[str] = frozenset()  # defense parameters the comparison varies: always in the label

    @property
    def label(self) -> str:
        keys = ", ".join(f"{k}={value_text(v)}" for k, v in self.values)
        return defense_label(self.defenses, keep=self.swept) + (f" · {keys}" if keys else "")


def swept_parameters(defense_lists: list[list[ComponentSpec]]) -> frozenset[str]:
    """The defense parameters whose values differ between settings of the same defense."""
    seen: dict[tuple[str, str], set[str]] = {}
    for specs in defense_lists:
        for spec in specs:
            for key, value in spec.params.items():
                seen.setdefault((spec.name, key), set()).add(repr(value))
    return frozenset(key for (_, key), values in seen.items() if len(values) > 1)


def settings(scenario: Scenario) -> list[CompareSetting]:
    """Every setting: each combination of the swept keys' values (outer), each defense list (inner)."""
    defenses = ([[]] if scenario.compare.baseline else []) + [
        [s] for spec in scenario.compare.defenses for s in expand_grid(spec)]
    grid = scenario.compare.grid
    combos = list(itertools.product(*grid.values())) if grid else [()]
    swept = swept_parameters(defenses)
    return [CompareSetting(d, tuple(zip(grid, combo, strict=True)), swept) for combo in combos for d in defenses]


def setting_slug(setting: CompareSetting) -> str:
    """A folder-name form of the setting's label."""
    keys = "_".join(f"{k.rsplit('.', 1)[-1]}={value_text(v)}" for k, v in setting.values)
    text = defense_label(setting.defenses, keep=setting.swept) + (f"_{keys}" if keys else "")
    return re.sub(r"[^A-Za-z0-9.=_-]+", "-", text).strip("-")


def setting_scenario(scenario: Scenario, setting: CompareSetting, folder_name: str) -> Scenario:
    """The scenario of one setting, validated as a scenario of its own (ScenarioError naming the key if not)."""
    raw = scenario.to_toml_dict() | {"name": f"{scenario.name}-{folder_name}",
                                     "defenses": [{"name": d.name, **d.params} for d in setting.defenses]}
    for key, value in setting.values:
        node = raw
        *sections, last = key.split(".")
        for part in sections:
            node = node.setdefault(part, {})
        node[last] = value
    return scenario_from_dict(raw)


def value_text(value: Any) -> str:
    """A swept value as labels and tables print it: lists in brackets (threat_model.rounds = [1])."""
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)
