"""Prior-only baselines: an attack re-run on an uninformative observation of the same shape and metadata.

The observation keeps the global model, the client's metadata and what it shares, but its update is computed,
exactly as the client computes it, on an unrelated batch of test-split images (never in any client's shard). Its
reconstruction, scored against the client's *real* batch, is what the attack's priors and start reach without
the client's signal; a leakage figure means something only above it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fl_sim.base.streams import BASELINE_BATCH
from fl_sim.data.images import ImageSet
from fl_sim.observation import Normalization, Observation
from fl_sim.observation.features import penultimate, prune
from fl_sim.training import LocalTraining, local_update

BASELINE = "baseline_"  # results.csv: the prior-only baseline's score of metric m is the row metric = baseline_m


def unrelated_batches(obs: Observation, pool_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The client's step structure over unrelated images: N = min(steps · B, examples) distinct indices; local
    epochs shuffle them into batches of B (the last one smaller) once per epoch, local steps take the t-th B of
    them, wrapping around."""
    meta, b = obs.meta, obs.meta.batch_size
    steps = 1 if obs.kind == "gradient" else meta.local_steps
    n = min(steps * b, max(meta.num_examples, 1), pool_size)
    chosen = rng.choice(pool_size, n, replace=False)
    if obs.kind == "weights" and meta.local_epochs > 0:
        epochs = [rng.permutation(chosen) for _ in range(meta.local_epochs)]
        return [perm[i : i + b] for perm in epochs for i in range(0, n, b)]
    return [chosen[np.arange(t * b, (t + 1) * b) % n] for t in range(steps)]


def uninformative(obs: Observation, model: torch.nn.Module, pool: ImageSet, norm: Normalization, seed: int,
                  device: torch.device) -> tuple[Observation, torch.Tensor]:
    """``obs`` with its update (and shared features) replaced by those of an unrelated batch from ``pool``, and
    that batch's labels (N,) (what an oracle-label ablation is handed for it)."""
    batches = unrelated_batches(obs, len(pool), BASELINE_BATCH.rng(seed, obs.client, obs.server_round))
    meta = obs.meta
    plan = LocalTraining(meta.protocol, meta.lr, meta.batch_size, len(batches), 0, meta.optimizer, meta.momentum,
                         meta.weight_decay, meta.batchnorm)
    model.load_state_dict(obs.global_state)
    features = None
    if obs.features is not None:
        x, _ = pool.batch(batches[0])
        with torch.no_grad():
            h = penultimate(model.eval(), norm.normalize(x.to(device))).cpu()
        features = prune(h, obs.features.ratio)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BASELINE_BATCH.seed(seed, obs.client, obs.server_round))
        update, _ = local_update(model, pool, batches, plan, norm, device)
    first_seen = list(dict.fromkeys(np.concatenate(batches).tolist()))  # the N images, in the order steps use them
    labels = pool.batch(np.asarray(first_seen))[1]
    return dataclasses.replace(obs, update={k: v.detach().cpu() for k, v in update.items()}, features=features), labels
