"""Client-side defenses by name: ``{name = "dp", sigma = 0.01, clip = 1.0}`` in a scenario's ``[[defenses]]``.

Each is a parameter model (checked at load) and a transform of the update the client is about to send.
Several defenses apply in the order listed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from defenses.base import Defense, DefenseContext, Params, Participation, Update, label
from defenses.dp_sgd import DpSgd, DpSgdParams
from defenses.features import FeatureNoise, FeatureNoiseParams, FeaturePrune, FeaturePruneParams
from defenses.local_dp import LocalDp, LocalDpParams
from defenses.secagg import AGGREGATE_CLIENT, SecAgg, SecAggParams
from defenses.soteria import Soteria, SoteriaParams
from defenses.update import GaussianMechanism, GaussianParams, Prune, PruneParams, Quantize, QuantizeParams
from fl_sim.registry import Registry


@dataclass(frozen=True)
class DefenseType:
    params: type[Params]
    build: type
    description: str
    protocols: tuple[str, ...] = ("fedsgd", "fedavg")  # the training protocols it can defend


DEFENSES: Registry[DefenseType] = Registry("defense")
DEFENSES.add("dp", DefenseType(GaussianParams, GaussianMechanism,
                               "clip the update to norm C, add Gaussian noise σ·C (ε from Opacus's RDP accountant)"))
DEFENSES.add("prune", DefenseType(PruneParams, Prune, "zero the smallest-magnitude fraction of the update (DLG)"))
DEFENSES.add("quantize", DefenseType(QuantizeParams, Quantize, "k-bit uniform or sign quantization of the update"))
DEFENSES.add("soteria", DefenseType(SoteriaParams, Soteria, "prune the representation layer's gradient (Soteria)"))
DEFENSES.add("dp-sgd", DefenseType(DpSgdParams, DpSgd, "Opacus DP-SGD in local training: per-sample clipping + noise "
                                                      "(BatchNorm models are fixed to GroupNorm)"))
DEFENSES.add("feature-prune", DefenseType(FeaturePruneParams, FeaturePrune, "shared features: prune to a higher ratio"))
DEFENSES.add("feature-noise", DefenseType(FeatureNoiseParams, FeatureNoise, "shared features: Gaussian noise σ"))
DEFENSES.add("secagg", DefenseType(SecAggParams, SecAgg, "Flower's SecAgg+: the server sees only the round's "
                                                        "aggregate, attacked as one batch of all clients' data"))
DEFENSES.add("local-dp", DefenseType(LocalDpParams, LocalDp, "Flower's LocalDpMod: clip the update, Gaussian noise "
                                                             "for (ε, δ) per round", protocols=("fedavg",)))


def build_defense(name: str, params: dict[str, Any]) -> Defense:
    """The named defense (pydantic ValidationError on bad keys or values, ValueError on an unknown name)."""
    kind = DEFENSES.get(name)
    return kind.build(kind.params.model_validate(params))


MODEL_FIXING_DEFENSES = frozenset(n for n, kind in DEFENSES.items() if hasattr(kind.build, "prepare_model"))


def prepare_model(specs: Sequence[Any], model: torch.nn.Module) -> torch.nn.Module:
    """The global model as the scenario's defenses need it (dp-sgd: Opacus's BatchNorm → GroupNorm fix)."""
    for spec in specs:
        fix = getattr(DEFENSES.get(spec.name).build, "prepare_model", None)
        model = fix(model) if fix is not None else model
    return model


def epsilon(specs: Sequence[Any], participation: Participation) -> float | None:
    """Σ ε of the defenses that define one (basic composition), None if none does."""
    budgets = [d.epsilon(participation) for d in (build_defense(s.name, s.params) for s in specs)
               if hasattr(d, "epsilon")]
    return sum(budgets) if budgets else None


def secure_aggregation(specs: Sequence[Any]) -> SecAgg | None:
    """The scenario's SecAgg+ defense, if it has one."""
    return next((build_defense(s.name, s.params) for s in specs if s.name == "secagg"), None)


def defense_label(specs: Sequence[Any]) -> str:
    """``none`` or ``dp(clip=1, sigma=0.01) + prune(ratio=0.9)``, for result rows and reports."""
    return " + ".join(label(s.name, build_defense(s.name, s.params).params, s.params) for s in specs) or "none"


def defend(defenses: Sequence[Defense], update: Update, global_state: dict[str, torch.Tensor],
           param_names: set[str], ctx: DefenseContext) -> Update:
    """Apply the update-stage ``defenses`` to the parameter part of a client's reply (message-stage ones,
    such as local-dp, run as Flower mods around the train function instead).

    FedSGD: ``update`` holds gradients (+ buffers). FedAvg: it holds the new weights; the defenses see
    the change θ_local − θ_global and the reply becomes θ_global + the defended change.
    """
    defenses = [d for d in defenses if getattr(d, "stage", "update") == "update"]
    if not defenses:
        return update
    fedavg = ctx.protocol == "fedavg"
    delta = {k: (v - global_state[k]) if fedavg else v for k, v in update.items() if k in param_names}
    for defense in defenses:
        delta = defense.apply(delta, ctx)
    out = dict(update)
    out.update({k: (global_state[k] + v) if fedavg else v for k, v in delta.items()})
    return out


__all__ = ["AGGREGATE_CLIENT", "DEFENSES", "Defense", "DefenseContext", "Participation", "build_defense", "defend",
           "defense_label", "epsilon", "prepare_model", "secure_aggregation"]
