"""Attacks of the curious server: ``reconstruct(observation, model) -> Reconstruction``, by name.

Gradient-matching presets (dlg, idlg, ggi, afgi, raf-gi) share one engine; the pruned-feature
inversion presets (feature-inversion, -lfw, -l1) another. TLDR (tldr, tldr-inversion) is a model attack:
``invert(global model, ...)`` instead of ``reconstruct`` (fl_sim.inversion runs it). A scenario entry
``{name = "ggi", iterations = 2000}`` overrides any recipe field.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attacks.base import Attack, Reconstruction
from attacks.feature_inversion import FEATURE_PRESETS, FeatureInversion, FeatureRecipe
from attacks.gradient_inversion import GradientInversion
from attacks.recipe import PRESETS, Recipe, recipe
from attacks.tldr import TLDR_PRESETS, NetworkInversion, TLDRRecipe
from fl_sim.registry import Registry

AttackFactory = Callable[[dict[str, Any]], Attack]
ATTACKS: Registry[AttackFactory] = Registry("attack")

for _preset in PRESETS:
    ATTACKS.add(_preset, lambda params, _p=_preset: GradientInversion(_p, recipe(_p, **params)))
for _preset, _values in FEATURE_PRESETS.items():
    ATTACKS.add(_preset, lambda params, _p=_preset, _v=_values: FeatureInversion(
        _p, FeatureRecipe.model_validate(_v | params)))
for _preset, _values in TLDR_PRESETS.items():
    ATTACKS.add(_preset, lambda params, _p=_preset, _v=_values: NetworkInversion(
        _p, TLDRRecipe.model_validate(_v | params)))

LRB_MODELS = ("resnet18", "resnet50")


def build_attack(name: str, params: dict[str, Any]) -> Attack:
    """The named attack with scenario overrides (pydantic ValidationError on bad keys or values)."""
    return ATTACKS.get(name)(params)


def incompatibility(attack: Attack, model_name: str, protocol: str, optimizer: str) -> str | None:
    """What in the scenario this attack cannot work with, stated up front (None if compatible)."""
    r = getattr(attack, "recipe", None)
    if not isinstance(r, Recipe):
        return None
    if r.labels == "lrb" and model_name not in LRB_MODELS:
        return (f"labels = 'lrb' needs the model's last residual block ({', '.join(LRB_MODELS)}), "
                f"not model '{model_name}'; use labels = 'yin' or 'idlg'")
    if protocol == "fedavg" and optimizer != "sgd":
        return f"FedAvg with optimizer '{optimizer}' cannot be unrolled by gradient matching; use optimizer 'sgd'"
    return None


__all__ = ["ATTACKS", "Attack", "Reconstruction", "build_attack", "incompatibility"]
