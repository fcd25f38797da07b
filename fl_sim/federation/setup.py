"""Federation: the data shards, model and device a scenario implies — built once per process and passed on."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from defenses import Releases, needs_poisson_batches, prepare_model
from fl_sim.base.errors import ScenarioError, UserInputError
from fl_sim.data.images import DataSplits
from fl_sim.data.partition import partition, poisson_batches, round_batches, split_holdout
from fl_sim.data.sources import load_dataset
from fl_sim.models import build_model
from fl_sim.observation import Normalization
from fl_sim.scenario import Scenario
from fl_sim.training import LocalTraining


@dataclass
class Federation:
    scenario: Scenario
    data: DataSplits
    shards: list[np.ndarray]  # per client: training indices into data.train
    holdouts: list[np.ndarray]  # per client: held-out indices for client evaluation
    norm: Normalization  # what the model input is normalized with
    device: torch.device
    template: nn.Module  # the round-0 global model (seeded init, pretrained weights if asked)

    def model(self) -> nn.Module:
        """A fresh copy of the round-0 global model on the scenario's device."""
        return copy.deepcopy(self.template).to(self.device)

    @property
    def poisson(self) -> bool:
        """Whether clients Poisson-sample their batches (their DP-SGD accountant assumes it)."""
        return needs_poisson_batches(self.scenario.defenses)

    def steps(self, client: int, plan: LocalTraining) -> int:
        """Local steps per round: FedSGD 1; FedAvg ``local_steps``, or one pass of the shard per local epoch."""
        if plan.protocol == "fedsgd" or not plan.local_epochs:
            return 1 if plan.protocol == "fedsgd" else plan.local_steps
        return plan.local_epochs * math.ceil(len(self.shards[client]) / plan.batch_size)

    def batches(self, client: int, server_round: int, plan: LocalTraining) -> list[np.ndarray]:
        """The client's batches this round, as the server's training instruction ``plan`` asks."""
        key = dict(seed=self.scenario.seed, client=client, server_round=server_round, batch_size=plan.batch_size)
        if self.poisson:
            return poisson_batches(self.shards[client], steps=self.steps(client, plan), **key)
        return round_batches(self.shards[client], local_steps=plan.local_steps, local_epochs=plan.local_epochs, **key)

    def releases(self, client: int, participations: int) -> Releases:
        """What the client has released after ``participations`` rounds, for its privacy accounting."""
        plan = LocalTraining.from_scenario(self.scenario.training)
        return Releases(participations, self.steps(client, plan), min(1.0, plan.batch_size / len(self.shards[client])))

    def union(self, clients: list[int], server_round: int) -> tuple[np.ndarray, ...]:
        """The batches of ``clients`` in ``server_round`` joined step by step (what a secure aggregate mixes)."""
        plan = LocalTraining.from_scenario(self.scenario.training)
        batches = [self.batches(c, server_round, plan) for c in clients]
        return tuple(np.concatenate([b[step] for b in batches]) for step in range(len(batches[0])))

    def max_examples(self) -> int:
        """The most examples a client reports as its weight (FedSGD: its batch; FedAvg: its shard)."""
        t = self.scenario.training
        return t.batch_size if t.protocol == "fedsgd" else max(len(s) for s in self.shards)

    @property
    def classes(self) -> list[str]:
        return self.data.classes or [str(c) for c in range(self.data.num_classes)]


def prepare(scenario: Scenario) -> Federation:
    """Load data, partition it and check the federation fits it (UserInputError otherwise)."""
    data = load_dataset(scenario.data)
    fed_cfg, d = scenario.federation, scenario.data
    if len(data.train) < 2 * fed_cfg.num_clients:
        raise ScenarioError(f"scenario key 'federation.num_clients': {fed_cfg.num_clients} clients need at least "
                            f"{2 * fed_cfg.num_clients} training images, '{d.dataset}' has {len(data.train)}; "
                            f"allowed: 1..{len(data.train) // 2}")
    try:
        shards = partition(data.train.labels, fed_cfg.num_clients, d.partition, d.alpha, d.seed)
    except ValueError as err:
        raise ScenarioError(f"scenario key 'data.alpha': {err}") from None
    split = [split_holdout(s, d.holdout_fraction, d.seed, c) for c, s in enumerate(shards)]
    norm = data.normalization if d.normalize else Normalization.identity(data.shape[0])
    device = resolve_device(scenario.device)
    template = prepare_model(scenario.defenses, build_model(scenario.model, data.num_classes, data.shape,
                                                            scenario.seed))
    return Federation(scenario, data, [t for t, _ in split], [h for _, h in split], norm, device, template)


def device_name(device: torch.device) -> str:
    """``cpu``, or ``cuda:0 (NVIDIA H200)``: the device and, for a GPU, its model."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("scenario key 'device': 'cuda' but no CUDA device is visible; allowed here: auto, cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
