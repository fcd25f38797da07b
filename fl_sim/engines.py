"""Engines: the transports that drive one ServerApp and its ClientApps, by name.

* ``inprocess``: an in-process Grid that hands each Message to the ClientApp directly (copying
  content both ways, as a transport would); fast, for quick runs and tests.
* ``simulation``: Flower's Simulation Engine (Ray), via ``flwr.simulation.run_simulation``.

Flower's Deployment Engine (SuperLink + SuperNodes) is :mod:`fl_sim.deploy`. An engine only moves
messages: what the apps do is :mod:`fl_sim.federation`'s.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fl_sim.base.registry import Registry
from fl_sim.base.streams import NODE_IDS

SERVER_NODE_ID = 1


@dataclass(frozen=True)
class Engine:
    """``run(server_app, client_app, num_nodes, seed, options)`` (``options``: the scenario's ``[simulation]``
    section); ``shares_process``: the ClientApps run in this process (so they may share what the server process
    has built)."""

    run: Callable[[ServerApp, ClientApp, int, int, Any], None]
    shares_process: bool
    description: str


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process (one Context per node)."""

    def __init__(self, client_app: ClientApp, num_nodes: int, seed: int = 0) -> None:
        self.client_app = client_app
        rng = NODE_IDS.rng(seed)
        node_ids = [int(n) for n in rng.choice(2**62, size=num_nodes, replace=False) + 2]
        self._run = Run.create_empty(run_id=int(rng.integers(2**62)))
        self.contexts = {
            node: Context(run_id=self._run.run_id, node_id=node, state=RecordDict(), run_config={},
                          node_config={"partition-id": pid, "num-partitions": num_nodes})
            for pid, node in enumerate(node_ids)}
        self._inbox: dict[str, Message] = {}
        self._claim_identity()

    def _claim_identity(self) -> None:
        """Messages are built from the process's TaskIdentity: here, the ServerApp's (as flwr's runtimes do)."""
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, self._run.run_id, SERVER_NODE_ID

    def set_run(self, run: Run) -> None:
        self._run = run
        self._claim_identity()

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            meta = msg.metadata.__dict__
            meta["_message_id"] = msg_id
            self._inbox[msg_id] = msg
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self._deliver(self._inbox.pop(i)) for i in list(message_ids) if i in self._inbox]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, msg: Message) -> Message:
        delivered = copy.deepcopy(msg)  # the client gets its own copy, as over a wire
        try:
            reply = self.client_app(delivered, self.contexts[msg.metadata.dst_node_id])
            return Message(copy.deepcopy(reply.content), reply_to=msg)
        except Exception as err:  # a failing client is a failed reply, as on a real SuperNode
            logging.getLogger("fl_sim").debug("client app raised", exc_info=True)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err).__name__}: {err}")
            return Message(error, reply_to=msg)


def run_inprocess(server_app: ServerApp, client_app: ClientApp, num_nodes: int, seed: int, options: Any = None
                  ) -> None:
    grid = InProcessGrid(client_app, num_nodes, seed)
    server_app(grid, Context(run_id=grid.run.run_id, node_id=SERVER_NODE_ID, node_config={}, state=RecordDict(),
                             run_config={}))


def ray_backend(options: Any) -> dict[str, Any]:
    """Flower's Ray backend config from the ``[simulation]`` section: each actor's CPUs and GPUs; ``ray.init``
    joins ``ray_address`` as it is (Ray refuses num_cpus / num_gpus when it connects to a cluster) or starts a
    local Ray with every CPU of this machine."""
    init: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": False}
    init |= {"address": options.ray_address} if options.ray_address else {"num_cpus": os.cpu_count() or 1}
    return {"client_resources": {"num_cpus": options.client_cpus, "num_gpus": options.client_gpus},
            "init_args": init}


def run_on_simulation_engine(server_app: ServerApp, client_app: ClientApp, num_nodes: int, seed: int,
                             options: Any) -> None:
    from flwr.simulation import run_simulation

    backend = ray_backend(options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_nodes,
                       backend_config=backend)


ENGINES: Registry[Engine] = Registry("engine")
ENGINES.add("inprocess", Engine(run_inprocess, True, "messages handed to the ClientApps in this process"))
ENGINES.add("simulation", Engine(run_on_simulation_engine, False, "Flower's Simulation Engine (Ray actors)"))
