"""SecAgg+ wiring: Flower's legacy workflow on the server, a FitIns/FitRes shim around the Message-API train.

Server: ``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))`` under a ``LegacyContext`` whose
strategy is :class:`CuriousSecAggFedAvg` — Flower's legacy FedAvg that samples clients like the
CuriousStrategy and, in ``aggregate_fit``, records what SecAgg+ lets it see: the unmasked weighted
mean of the sampled clients' updates, one Observation (client −1) per round. Its evaluation-only record — the
union of the clients' batches — is rebuilt by the simulation from (seed, client, round); nothing of it
travels to the server.

Client: SecAgg+ sends legacy ``fitins.*`` records through ``secaggplus_mod``; :func:`legacy_fit`
turns them into the train function's state dict and config and its update into a ``FitRes``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid

from defenses import AGGREGATE_CLIENT
from defenses.secagg import SecAgg
from fl_sim.federation.protocol import Batches, ObservedModel, RoundRecord, fedsgd_step, observation, sample_clients
from fl_sim.scenario import Scenario

log = logging.getLogger("fl_sim")
Update = dict[str, torch.Tensor]


# --- client side --------------------------------------------------------------------------------
def is_legacy_fit(msg: Message) -> bool:
    return "fitins.parameters" in msg.content.array_records


def legacy_fit(msg: Message, template: dict[str, torch.Tensor],
               local_round: Callable[[Update, Any], tuple[Update, dict[str, Any]]]) -> Message:
    """FitIns (arrays in ``template``'s key order) → ``local_round(state, config)`` → FitRes."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    arrays = parameters_to_ndarrays(fitins.parameters)
    state = {k: torch.from_numpy(np.array(a)).to(v.dtype) for (k, v), a in zip(template.items(), arrays, strict=True)}
    update, metrics = local_round(state, fitins.config)
    parameters = ndarrays_to_parameters([update[k].detach().cpu().float().numpy() for k in template])
    fitres = FitRes(Status(Code.OK, ""), parameters, int(metrics["num-examples"]),
                    {k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


# --- server side --------------------------------------------------------------------------------
class CuriousSecAggFedAvg(LegacyFedAvg):
    """Flower's legacy FedAvg for the SecAgg+ workflow; records the one aggregate it is allowed to see.

    It samples like the CuriousStrategy and takes the same FedSGD step (fl_sim.federation.protocol).
    ``union(clients, round)``: the batches of the round's clients, step by step, as the simulation knows
    them — the aggregate's evaluation-only record (nothing of it travels to the server)."""

    def __init__(self, *, scenario: Scenario, observed: ObservedModel, node_clients: dict[int, int],
                 initial: dict[str, torch.Tensor], round_offset: int, on_round: Callable[[RoundRecord], None],
                 evaluate: Callable[[int, dict[str, torch.Tensor]], tuple[float, float]],
                 union: Callable[[list[int], int], Batches]) -> None:
        n = scenario.federation.clients_per_round
        super().__init__(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_evaluate_clients=0,
                         min_available_clients=n, initial_parameters=self._parameters(initial))
        self.scenario, self.observed, self.node_clients = scenario, observed, node_clients
        self.keys = list(initial)
        self.template = initial
        self.offset, self.on_round, self.evaluate_round, self.union = round_offset, on_round, evaluate, union
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self._clients: dict[int, list[int]] = {}

    @staticmethod
    def _parameters(state: dict[str, torch.Tensor]) -> Parameters:
        return ndarrays_to_parameters([v.detach().cpu().float().numpy() for v in state.values()])

    def _state(self, parameters: Parameters, floating: bool = False) -> dict[str, torch.Tensor]:
        """The state dict in the template's key order (``floating``: keep the float32 wire values)."""
        arrays = parameters_to_ndarrays(parameters)
        state = {k: torch.from_numpy(np.array(a)) for k, a in zip(self.keys, arrays, strict=True)}
        return state if floating else {k: v.to(self.template[k].dtype) for k, v in state.items()}

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any
                      ) -> list[tuple[Any, FitIns]]:
        real = server_round + self.offset
        clients = sample_clients(self.scenario.seed, sorted(self.node_clients.values()),
                                 self.scenario.federation.clients_per_round, real)
        by_client = {c: n for n, c in self.node_clients.items()}
        proxies = client_manager.all()
        config = dict(self.observed.plan.to_record()) | {"server-round": real}
        self._sent[real], self._clients[real] = self._state(parameters), clients
        return [(proxies[str(by_client[c])], FitIns(parameters, config)) for c in clients]

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple[Parameters | None, dict]:
        real = server_round + self.offset
        sent, clients = self._sent.pop(real), self._clients.pop(real)
        record = RoundRecord(real, sent, clients=clients)
        record.failures += [f"{f}" for f in failures]
        if not results:
            self.on_round(record)
            return None, {}
        # SecAgg+ put the unmasked weighted mean in every FitRes
        aggregate = self._state(results[0][1].parameters, floating=True)
        union = self.union(clients, real)
        plan, m = self.observed.plan, self.observed
        if self.scenario.attacked(real, AGGREGATE_CLIENT) or self.scenario.threat_model.record == "all":
            reported = {"num-examples": sum(int(r.num_examples) for _, r in results), "batch-size": len(union[0]),
                        "local-steps": len(union), "lr": plan.lr, "train-loss": float("nan"),
                        "client-id": AGGREGATE_CLIENT}
            observed_update = {k: v.to(self.template[k].dtype) for k, v in aggregate.items()}
            record.observations.append(observation(real, sent, observed_update, reported, m))
            record.batches[AGGREGATE_CLIENT] = union
        new = fedsgd_step(sent, aggregate, plan.lr, m.param_names) if plan.protocol == "fedsgd" else {
            k: v.to(self.template[k].dtype) for k, v in aggregate.items()}
        self.on_round(record)
        return self._parameters(new), {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        state = self._state(parameters)
        loss, acc = self.evaluate_round(server_round + self.offset if server_round else 0, state)
        return loss, {"test-acc": acc}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list:
        return []  # no federated evaluation under SecAgg+ (its legacy messages would need their own shim)


def run_secagg_rounds(grid: Grid, scenario: Scenario, secagg: SecAgg, observed: ObservedModel,
                      node_clients: dict[int, int], initial: dict[str, torch.Tensor], start: int,
                      on_round: Callable[[RoundRecord], None], end: Any, union: Callable[[list[int], int], Batches],
                      max_examples: int) -> None:
    """The remaining rounds on Flower's legacy DefaultWorkflow with the SecAgg+ fit workflow; ``max_examples``:
    the most examples a client reports (SecAgg+ scales updates by examples / max_weight)."""
    records: dict[int, RoundRecord] = {}

    def keep(record: RoundRecord) -> None:
        on_round(record)
        records[record.server_round] = record

    def evaluate(server_round: int, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        if server_round == 0 or server_round not in records:
            return end.test(state)
        return end(records.pop(server_round), state)

    strategy = CuriousSecAggFedAvg(scenario=scenario, observed=observed, node_clients=node_clients, initial=initial,
                                   round_offset=start, on_round=keep, evaluate=evaluate, union=union)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            config=ServerConfig(num_rounds=scenario.federation.rounds - start), strategy=strategy)
    DefaultWorkflow(fit_workflow=secagg.workflow(max_examples))(grid, context)
