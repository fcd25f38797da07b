"""One client's Observation and Secret outside a federation — for benchmarks and quick experiments.

Runs exactly the client's local update (:func:`fl_sim.training.local_update`) from the model's current
weights and builds the Observation as the curious strategy does (:func:`fl_sim.federation.protocol.observation`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from fl_sim.data.images import ImageSet
from fl_sim.federation.protocol import ObservedModel, client_metrics, observation
from fl_sim.leakage.secret import Secret, first_use
from fl_sim.observation import Normalization, Observation
from fl_sim.training import LocalTraining, local_update


def observe(model: nn.Module, pool: ImageSet, batches: list[np.ndarray], plan: LocalTraining,
            norm: Normalization, num_classes: int, device: torch.device | str = "cpu",
            server_round: int = 1, client: int = 0) -> tuple[Observation, Secret]:
    """(what the server sees, what the client used) for one local update on ``batches``; the client
    reports the distinct examples it used (its shard: epochs revisit them) as its weight."""
    device = torch.device(device)
    global_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    local = copy.deepcopy(model).to(device)
    update, loss = local_update(local, pool, batches, plan, norm, device)
    reported = client_metrics(client, batches, loss, plan, shard_size=len(first_use(tuple(batches))))
    obs = observation(server_round, global_state, {k: v.cpu() for k, v in update.items()}, reported,
                      ObservedModel.of(model, plan, norm, num_classes, pool.shape))
    return obs, Secret(server_round, client, tuple(np.asarray(b) for b in batches))


def fedsgd_plan(lr: float = 0.1, batch_size: int = 1, batchnorm: str = "train") -> LocalTraining:
    return LocalTraining("fedsgd", lr, batch_size, 1, 0, "sgd", 0.0, 0.0, batchnorm)
