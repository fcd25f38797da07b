"""Defenses by name: ``{name = "dp", sigma = 0.01, clip = 1.0}`` in a scenario's ``[[defenses]]``.

Each registry entry is a parameter model (checked at load), the class that implements it — whose base
declares its stage (defenses.base.Stage) — and what it needs of the scenario. Code asks the entry for
the stage; defenses of one stage apply in the order listed.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from defenses.base import (
    ADVERSARY,
    Accountant,
    Budget,
    Defense,
    DefenseContext,
    FeatureDefense,
    MessageDefense,
    Params,
    ProtocolDefense,
    Releases,
    Stage,
    TrainingDefense,
    Update,
    UpdateDefense,
    label,
)
from defenses.dp_sgd import DpSgd, DpSgdParams
from defenses.features import FeatureNoise, FeatureNoiseParams, FeaturePrune, FeaturePruneParams, needs_shared_features
from defenses.local_dp import LocalDp, LocalDpParams
from defenses.secagg import AGGREGATE_CLIENT, SecAgg, SecAggParams, needs_two_clients
from defenses.soteria import Soteria, SoteriaParams
from defenses.update import GaussianMechanism, GaussianParams, Prune, PruneParams, Quantize, QuantizeParams
from fl_sim.base.registry import Registry


@dataclass(frozen=True)
class DefenseType:
    params: type[Params]
    build: type[Defense]
    description: str
    protocols: tuple[str, ...] = ("fedsgd", "fedavg")  # the training protocols it can defend
    requires: Callable[[Any], str | None] | None = None  # what it needs of the scenario (None: fine)

    def __post_init__(self) -> None:
        stage_bases = (TrainingDefense, UpdateDefense, FeatureDefense, MessageDefense)  # ProtocolDefense ⊂ Message
        if not issubclass(self.build, stage_bases) or inspect.isabstract(self.build):
            raise TypeError(f"{self.build.__name__} must implement one stage's base class of defenses.base")

    @property
    def stage(self) -> Stage:
        return self.build.stage

    @property
    def accounted(self) -> bool:
        """Whether it defines a privacy budget (ε)."""
        return issubclass(self.build, Accountant)


DEFENSES: Registry[DefenseType] = Registry("defense")
DEFENSES.add("dp", DefenseType(GaussianParams, GaussianMechanism,
                               "clip the update to norm C, add Gaussian noise σ·C (ε from Opacus's RDP accountant)"))
DEFENSES.add("prune", DefenseType(PruneParams, Prune, "zero the smallest-magnitude fraction of the update (DLG)"))
DEFENSES.add("quantize", DefenseType(QuantizeParams, Quantize, "k-bit uniform or sign quantization of the update"))
DEFENSES.add("soteria", DefenseType(SoteriaParams, Soteria, "prune the representation layer's gradient (Soteria)"))
DEFENSES.add("dp-sgd", DefenseType(DpSgdParams, DpSgd, "Opacus DP-SGD in local training: per-sample clipping + noise "
                                                      "(BatchNorm models are fixed to GroupNorm)"))
DEFENSES.add("feature-prune", DefenseType(FeaturePruneParams, FeaturePrune, "shared features: prune to a higher ratio",
                                          requires=needs_shared_features))
DEFENSES.add("feature-noise", DefenseType(FeatureNoiseParams, FeatureNoise, "shared features: Gaussian noise σ",
                                          requires=needs_shared_features))
DEFENSES.add("secagg", DefenseType(SecAggParams, SecAgg, "Flower's SecAgg+: the server sees only the round's "
                                                        "aggregate, attacked as one batch of all clients' data",
                                   requires=needs_two_clients))
DEFENSES.add("local-dp", DefenseType(LocalDpParams, LocalDp, "Flower's LocalDpMod: clip the update, Gaussian noise "
                                                             "for (ε, δ) per round", protocols=("fedavg",)))


def build_defense(name: str, params: dict[str, Any]) -> Defense:
    """The named defense (pydantic ValidationError on bad keys or values, ValueError on an unknown name)."""
    kind = DEFENSES.get(name)
    return kind.build(kind.params.model_validate(params))


def build_all(specs: Sequence[Any]) -> list[Defense]:
    return [build_defense(s.name, s.params) for s in specs]


def of_stage(defenses: Sequence[Defense], *stages: Stage) -> list[Any]:
    """The defenses of the given stages, in the scenario's order."""
    return [d for d in defenses if d.stage in stages]


def prepare_model(specs: Sequence[Any], model: torch.nn.Module) -> torch.nn.Module:
    """The global model as the scenario's training-stage defenses need it (dp-sgd: Opacus's BatchNorm → GroupNorm)."""
    for spec in specs:
        build = DEFENSES.get(spec.name).build
        if issubclass(build, TrainingDefense):
            model = build.prepare_model(model)
    return model


def accountants(specs: Sequence[Any]) -> list[tuple[str, Accountant]]:
    """(defense name, the defense) for every scenario defense that defines a privacy budget."""
    return [(s.name, d) for s, d in zip(specs, build_all(specs), strict=True) if isinstance(d, Accountant)]


def needs_poisson_batches(specs: Sequence[Any]) -> bool:
    """Whether the scenario's local training needs Poisson-sampled batches (DP-SGD's accountant assumes them)."""
    return any(issubclass(kind.build, TrainingDefense) and kind.build.poisson_batches
               for kind in (DEFENSES.get(s.name) for s in specs))


def secure_aggregation(specs: Sequence[Any]) -> ProtocolDefense | None:
    """The scenario's protocol-stage defense (SecAgg+), if it has one."""
    return next(iter(of_stage(build_all(specs), Stage.PROTOCOL)), None)


def defense_label(specs: Sequence[Any], full: bool = False, keep: Iterable[str] = ()) -> str:
    """``none`` or ``dp(sigma=0.01) + prune(ratio=0.9)`` (what differs from the defaults, and the ``keep``
    parameters), for result rows and reports; ``full``: every parameter, defaults included (comparison.csv)."""
    return " + ".join(label(s.name, build_defense(s.name, s.params).params, None if full else s.params, keep)
                      for s in specs) or "none"


def defend(defenses: Sequence[Defense], update: Update, global_state: dict[str, torch.Tensor],
           param_names: set[str], ctx: DefenseContext) -> Update:
    """Apply the update-stage ``defenses`` to the parameter part of a client's reply.

    FedSGD: ``update`` holds gradients (+ buffers). FedAvg: it holds the new weights; the defenses see
    the change θ_local − θ_global and the reply becomes θ_global + the defended change.
    """
    transforms: list[UpdateDefense] = of_stage(defenses, Stage.UPDATE)
    if not transforms:
        return update
    fedavg = ctx.protocol == "fedavg"
    delta = {k: (v - global_state[k]) if fedavg else v for k, v in update.items() if k in param_names}
    for defense in transforms:
        delta = defense.apply(delta, ctx)
    out = dict(update)
    out.update({k: (global_state[k] + v) if fedavg else v for k, v in delta.items()})
    return out


__all__ = ["ADVERSARY", "AGGREGATE_CLIENT", "DEFENSES", "Budget", "Defense", "DefenseContext", "DefenseType",
           "FeatureDefense", "MessageDefense", "ProtocolDefense", "Releases", "Stage", "TrainingDefense",
           "UpdateDefense", "accountants", "build_all", "build_defense", "defend", "defense_label", "of_stage",
           "needs_poisson_batches", "prepare_model", "secure_aggregation"]
