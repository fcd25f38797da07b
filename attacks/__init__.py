"""Attacks of the curious server by name; each registry entry names its kind (attacks.base).

Gradient-matching presets (dlg, idlg, ggi, afgi, raf-gi) share one engine; the pruned-feature inversion
presets (feature-inversion, -lfw, -l1, -tuned) another — both attack Observations. TLDR (tldr,
tldr-inversion) attacks the global model. A scenario entry ``{name = "ggi", iterations = 2000}``
overrides any recipe field.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from attacks.base import Attack, Inversion, ModelAttack, ObservationAttack, Reconstruction, Target
from attacks.feature_inversion import FEATURE_PRESETS, FeatureInversion, FeatureRecipe
from attacks.gradient_inversion import GradientInversion
from attacks.recipe import PRESETS, recipe
from attacks.tldr import TLDR_PRESETS, NetworkInversion, TLDRRecipe
from fl_sim.base.registry import Registry


@dataclass(frozen=True)
class AttackType:
    """``build(overrides)`` → the attack; ``kind`` the class it builds (which declares its target)."""

    build: Callable[[dict[str, Any]], Attack]
    kind: type[ObservationAttack] | type[ModelAttack]

    def __post_init__(self) -> None:
        if not issubclass(self.kind, ObservationAttack | ModelAttack):
            raise TypeError(f"{self.kind.__name__} must extend ObservationAttack or ModelAttack (attacks.base)")

    @property
    def target(self) -> Target:
        return self.kind.target


ATTACKS: Registry[AttackType] = Registry("attack")

for _preset in PRESETS:
    ATTACKS.add(_preset, AttackType(lambda params, _p=_preset: GradientInversion(_p, recipe(_p, **params)),
                                    GradientInversion))
for _preset, _values in FEATURE_PRESETS.items():
    ATTACKS.add(_preset, AttackType(lambda params, _p=_preset, _v=_values: FeatureInversion(
        _p, FeatureRecipe.model_validate(_v | params)), FeatureInversion))
for _preset, _values in TLDR_PRESETS.items():
    ATTACKS.add(_preset, AttackType(lambda params, _p=_preset, _v=_values: NetworkInversion(
        _p, TLDRRecipe.model_validate(_v | params)), NetworkInversion))


def build_attack(name: str, params: dict[str, Any]) -> Attack:
    """The named attack with scenario overrides (pydantic ValidationError on bad keys or values)."""
    kind = ATTACKS.get(name)
    attack = kind.build(params)
    if not isinstance(attack, kind.kind):
        raise TypeError(f"attack '{name}' built a {type(attack).__name__}, its entry says {kind.kind.__name__}")
    return attack


def targets(name: str) -> Target:
    """What the named attack reads: one client's Observation, or the global model."""
    return ATTACKS.get(name).target


__all__ = ["ATTACKS", "Attack", "AttackType", "Inversion", "ModelAttack", "ObservationAttack", "Reconstruction",
           "Target", "build_attack", "targets"]
