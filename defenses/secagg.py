"""Secure aggregation with Flower's SecAgg+ (Bell et al. 2020): the server learns only the round's aggregate.

Flower 1.41 offers SecAgg+ on its legacy workflow path only: the ServerApp runs
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` under a ``LegacyContext`` and the
ClientApp's train function runs behind ``secaggplus_mod`` (wiring in :mod:`fl_sim.secagg`). Each
client masks its quantised, weight-scaled update; the masks cancel in the sum. The curious server
then observes one update per round — the weighted mean of the sampled clients' updates — and
attacks it as one batch made of all their batches.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from defenses.base import Params, ProtocolDefense

AGGREGATE_CLIENT = -1  # the "client" of an Observation that is the whole round's aggregate


def needs_two_clients(scenario: Any) -> str | None:
    """SecAgg+ masks pairwise, so a round needs two clients. With two, each could read the other's update off the
    next global model; against the curious server (fl-sim's adversary) their sum still hides each."""
    if scenario.federation.clients_per_round < 2:
        return (f"SecAgg+ needs at least 2 clients per round (pairwise masks), federation.clients_per_round = "
                f"{scenario.federation.clients_per_round}")
    return None


class SecAggParams(Params):
    num_shares: float = Field(1.0, gt=0, le=1, description="fraction of the round's clients each secret is shared with")
    reconstruction_threshold: float = Field(0.7, gt=0, le=1, description="fraction of shares needed to unmask")
    clipping_range: float = Field(8.0, gt=0, description="update values are clipped to ±clipping_range")
    quantization_range: int = Field(4_194_304, ge=2, description="quantisation levels over the clipping range")
    max_weight: float | None = Field(None, gt=0, description="upper bound on a client's number of examples; "
                                     "default: the largest a client of the scenario reports (best precision)")


class SecAgg(ProtocolDefense):
    params: SecAggParams

    def mod(self):  # noqa: ANN201 - a Flower client mod
        from flwr.client.mod import secaggplus_mod

        return secaggplus_mod

    def workflow(self, max_examples: int):  # noqa: ANN201 - a Flower server workflow
        """Flower's SecAgg+ fit workflow; clients scale updates by examples / max_weight before quantising,
        so ``max_weight`` defaults to ``max_examples`` (the most any client reports)."""
        from flwr.server.workflow import SecAggPlusWorkflow

        p = self.params
        return SecAggPlusWorkflow(num_shares=p.num_shares, reconstruction_threshold=p.reconstruction_threshold,
                                  max_weight=p.max_weight or float(max_examples), clipping_range=p.clipping_range,
                                  quantization_range=p.quantization_range)
