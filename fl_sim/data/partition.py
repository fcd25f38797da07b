"""Client shards (IID or Dirichlet(α) over labels) and the batches each client uses per round (drawn without
replacement, or Poisson-sampled for DP-SGD).

Everything here is a pure function of (labels, seed, client, round): shards and batches are
reproducible, which is what lets the simulation recover a client's Secret from sample indices.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fl_sim.base.registry import Registry
from fl_sim.base.streams import BATCHES, HOLDOUT, PARTITION_DIRICHLET, PARTITION_IID

Partitioner = Callable[[np.ndarray, int, float, int], list[np.ndarray]]
PARTITIONS: Registry[Partitioner] = Registry("partition")


@PARTITIONS.register("iid")
def iid(labels: np.ndarray, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Uniformly shuffled, near-equal shards."""
    order = PARTITION_IID.rng(seed).permutation(len(labels))
    return [np.sort(part) for part in np.array_split(order, num_clients)]


@PARTITIONS.register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, alpha: float, seed: int, min_size: int = 2,
              max_tries: int = 1000) -> list[np.ndarray]:
    """Label-skewed shards: each class is split over clients with proportions ~ Dir(α).

    Resamples (deterministically) until every client holds at least ``min_size`` examples,
    the procedure of Hsu et al. 2019 / Li et al. (NIID-Bench).
    """
    rng = PARTITION_DIRICHLET.rng(seed)
    n = len(labels)
    min_size = min(min_size, n // num_clients)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for k in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == k))
            p = rng.dirichlet(np.full(num_clients, alpha))
            p = p * np.array([len(s) < n / num_clients for s in shards])  # balance, as NIID-Bench does
            p = p / p.sum() if p.sum() > 0 else np.full(num_clients, 1 / num_clients)
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for shard, part in zip(shards, np.split(idx, cuts), strict=True):
                shard.extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, dtype=np.int64)) for s in shards]
    raise ValueError(f"Dirichlet(α={alpha}) could not give each of {num_clients} clients {min_size} examples "
                     f"in {max_tries} draws; raise data.alpha or lower federation.num_clients")


def partition(labels: np.ndarray, num_clients: int, scheme: str, alpha: float, seed: int) -> list[np.ndarray]:
    """Disjoint shards covering every index once: list of sorted index arrays, one per client."""
    return PARTITIONS.get(scheme)(np.asarray(labels), num_clients, alpha, seed)


def split_holdout(shard: np.ndarray, fraction: float, seed: int, client: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) parts of a client's shard; the held-out part is for client evaluation."""
    if len(shard) < 2 or fraction <= 0:
        return shard, shard[:0]
    n_val = min(len(shard) - 1, max(1, int(round(fraction * len(shard)))))
    order = HOLDOUT.rng(seed, client).permutation(shard)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def round_batches(shard: np.ndarray, *, seed: int, client: int, server_round: int, batch_size: int,
                  local_steps: int = 1, local_epochs: int = 0) -> list[np.ndarray]:
    """The batches (as dataset indices) a client trains on in one round, in order.

    ``local_epochs > 0``: that many shuffled passes over the shard (last batch may be smaller);
    otherwise ``local_steps`` batches, each drawn without replacement.
    """
    rng = BATCHES.rng(seed, client, server_round)
    if local_epochs > 0:
        out = []
        for _ in range(local_epochs):
            perm = rng.permutation(shard)
            out.extend(perm[i : i + batch_size] for i in range(0, len(perm), batch_size))
        return out
    size = min(batch_size, len(shard))
    return [rng.choice(shard, size=size, replace=False) for _ in range(local_steps)]


def poisson_batches(shard: np.ndarray, *, seed: int, client: int, server_round: int, batch_size: int,
                    steps: int) -> list[np.ndarray]:
    """``steps`` Poisson samples of the shard, as Opacus's DPDataLoader draws them: each example joins a batch
    independently with rate q = batch_size / |shard| (sizes vary, and may be 0), ascending indices."""
    rng = BATCHES.rng(seed, client, server_round)
    rate = min(1.0, batch_size / max(1, len(shard)))
    return [np.sort(shard[rng.random(len(shard)) < rate]) for _ in range(steps)]
