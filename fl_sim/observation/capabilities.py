"""What the curious server may know — the threat model's capabilities, by name.

Each attack declares the capabilities it reads (``ObservationAttack.capabilities``); a scenario's
``[threat_model] knows`` grants them. The default grant is what a Flower server really receives from
its clients; oracle labels and surrogate data are never granted unless the scenario says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from fl_sim.base.registry import Registry


class Capability(StrEnum):
    UPDATE = "update"
    GLOBAL_MODEL = "global_model"
    PROTOCOL = "protocol"
    NUM_EXAMPLES = "num_examples"
    BN_BUFFERS = "bn_buffers"
    SHARED_FEATURES = "shared_features"
    ORACLE_LABELS = "oracle_labels"
    SURROGATE_DATA = "surrogate_data"


@dataclass(frozen=True)
class CapabilityInfo:
    """``received``: a Flower server has it without asking anything of the client (the default grant);
    ``upper_bound``: an attack that uses it measures a best case, not the realistic one."""

    description: str
    received: bool
    upper_bound: bool = False


CAPABILITIES: Registry[CapabilityInfo] = Registry("capability")
for _cap, _info in {
    Capability.UPDATE: CapabilityInfo("the client's update: its gradient (FedSGD) or weights (FedAvg)", True),
    Capability.GLOBAL_MODEL: CapabilityInfo("the global model the server sent (architecture and weights)", True),
    Capability.PROTOCOL: CapabilityInfo("the protocol the server configured: lr, local steps / epochs, batch size, "
                                        "optimizer, BatchNorm mode", True),
    Capability.NUM_EXAMPLES: CapabilityInfo("the number of examples the client reports (its aggregation weight)", True),
    Capability.BN_BUFFERS: CapabilityInfo("the BatchNorm buffers the client returns with its update", True),
    Capability.SHARED_FEATURES: CapabilityInfo("penultimate features the client shares (when the scenario has "
                                               "clients share them)", False),
    Capability.ORACLE_LABELS: CapabilityInfo("the client's true labels (an ablation)", False, upper_bound=True),
    Capability.SURROGATE_DATA: CapabilityInfo("data from the clients' distribution held by the server", False),
}.items():
    CAPABILITIES.add(_cap.value, _info)


def flower_server(shares_features: bool) -> frozenset[Capability]:
    """What a Flower server receives: its own model and protocol, each reply's arrays and metrics (and the
    features, when clients share them)."""
    received = {Capability(name) for name, info in CAPABILITIES.items() if info.received}
    return frozenset(received | ({Capability.SHARED_FEATURES} if shares_features else set()))
