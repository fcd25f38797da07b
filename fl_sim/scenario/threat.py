"""Each attack's assumptions in a scenario: the capabilities it reads and the settings that make its numbers a
best case (an upper bound on leakage) rather than the realistic case."""

from __future__ import annotations

from dataclasses import dataclass

from fl_sim.scenario.schema import ComponentSpec, Scenario

ORACLE = "oracle labels"
EVAL_BN = "clients' BatchNorm in eval mode (in practice clients train it in train mode)"
UNTRAINED = "untrained model"


@dataclass(frozen=True)
class Assumptions:
    """``upper_bound``: reason → the rounds it holds in (None: every round)."""

    attack: str
    capabilities: tuple[str, ...]
    upper_bound: dict[str, tuple[int, ...] | None]

    def reasons(self, server_round: int) -> list[str]:
        """The upper-bound settings in force when the attack ran at ``server_round``."""
        return [why for why, rounds in self.upper_bound.items() if rounds is None or server_round in rounds]


def assumptions(scenario: Scenario, specs: list[ComponentSpec] | None = None) -> list[Assumptions]:
    """One entry per attack of the scenario (or ``specs``), in order."""
    from attacks import ObservationAttack, build_attack
    from attacks.bn_buffers import batchnorm_layers
    from fl_sim.models import structure
    from fl_sim.observation.capabilities import CAPABILITIES

    has_bn = bool(batchnorm_layers(structure(scenario.model.name)))
    untrained = not scenario.model.pretrained and scenario.model.weights is None
    out = []
    for spec in scenario.attacks if specs is None else specs:
        attack = build_attack(spec.name, spec.params)
        used = sorted(attack.capabilities(scenario.setting))
        upper: dict[str, tuple[int, ...] | None] = {}
        if any(CAPABILITIES.get(c).upper_bound for c in used):
            upper[ORACLE] = None
        if isinstance(attack, ObservationAttack):
            if has_bn and scenario.training.batchnorm == "eval":
                upper[EVAL_BN] = None
            if untrained and scenario.attacked_round(1):
                upper[UNTRAINED] = (1,)
        out.append(Assumptions(spec.shown, tuple(used), upper))
    return out
