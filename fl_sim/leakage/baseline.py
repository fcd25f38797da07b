"""Prior-only baselines: an attack re-run on an uninformative observation of the same shape and metadata.

The observation keeps the global model, the client's metadata and what it shares, but its update is what the
client's own local training and defenses (training- and update-stage; :func:`defended_update`) produce on an
unrelated batch of test-split images (never in any client's shard), with noise of its own. Its
reconstruction, scored against the client's *real* batch, is what the attack's priors and start reach without
the client's signal; a leakage figure means something only above it. Message-stage defenses (Flower mods such
as LocalDpMod) act on the wire and are not replayed.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from defenses import build_all
from fl_sim.base.streams import BASELINE_BATCH, BASELINE_NOISE
from fl_sim.leakage.secret import first_use
from fl_sim.observation import Observation
from fl_sim.training import LocalTraining

if TYPE_CHECKING:
    from fl_sim.federation.setup import Federation

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


def uninformative(obs: Observation, fed: Federation) -> tuple[Observation, torch.Tensor]:
    """``obs`` with its update (and shared features) replaced by those of an unrelated batch from the test split,
    and that batch's labels (N,) in first-use order (what an oracle-label ablation is handed for it)."""
    from fl_sim.federation.client import defended_update, share_features

    seed, pool = fed.scenario.seed, fed.data.test
    rng = BASELINE_BATCH.rng(seed, obs.client, obs.server_round)
    batches = unrelated_batches(obs, len(pool), rng)
    noise_seed = BASELINE_NOISE.seed(seed, obs.client, obs.server_round)
    meta = obs.meta
    plan = LocalTraining(meta.protocol, meta.lr, meta.batch_size, len(batches), 0, meta.optimizer, meta.momentum,
                         meta.weight_decay, meta.batchnorm)
    defenses = build_all(fed.scenario.defenses)
    model = fed.model()
    model.load_state_dict(obs.global_state)
    update, _ = defended_update(fed, defenses, model, pool, batches, plan, obs.global_state, noise_seed,
                                torch.Generator().manual_seed(BASELINE_NOISE.seed(seed, obs.client, obs.server_round)))
    features = None
    if obs.features is not None:
        model.load_state_dict(obs.global_state)
        features = share_features(model.eval(), fed, batches[0], obs.features.ratio, defenses,
                                  torch.Generator().manual_seed(BASELINE_NOISE.seed(seed, obs.client,
                                                                                    obs.server_round)), pool)
    labels = pool.batch(first_use(batches))[1]
    return dataclasses.replace(obs, update={k: v.detach().cpu() for k, v in update.items()}, features=features), labels
