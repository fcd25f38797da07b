"""Named random streams: every random draw of a run comes from one row of :data:`STREAMS`.

A stream is keyed ``[seed, tag, *coordinates]``: its own tag in the second place and a fixed number of
coordinates, so no two streams — and no two coordinates of one stream — share a NumPy seed sequence
(SeedSequence ignores trailing zeros, so keys are only compared with keys of their own tag and length).
Streams that seed torch (or NumPy's global RNG, for library code) take one 32-bit word of their sequence.
``seed`` is the scenario's, the data's or an attack recipe's, as each row says; negative coordinates
(client −1, a secure aggregate) are taken modulo 2**32.

Two streams keep the keys they had before this table (``tag`` None), so published splits and models stay:
the test split (``SeedSequence([data.seed])``) and the round-0 model (``torch.manual_seed(seed)``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Stream:
    name: str
    tag: int | None  # None: the key this stream had before the table (see the module docstring)
    coordinates: tuple[str, ...]  # what a draw is keyed by, after the seed
    seed_from: str  # whose seed: the scenario's ``seed``, ``data.seed`` or an attack recipe's ``seed``
    engine: Literal["numpy", "seed"]  # a NumPy Generator, or an integer seed (torch, NumPy's global RNG)

    def key(self, seed: int, *coordinates: int) -> list[int]:
        if len(coordinates) != len(self.coordinates):
            raise TypeError(f"stream '{self.name}' is keyed by ({', '.join(self.coordinates)}), got {coordinates}")
        if self.tag is None:
            return [int(seed)]
        return [int(seed), self.tag, *(int(c) % 2**32 for c in coordinates)]

    def rng(self, seed: int, *coordinates: int) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence(self.key(seed, *coordinates)))

    def seed(self, seed: int, *coordinates: int) -> int:
        """An integer seed from the stream (the seed itself for a stream that kept its old key)."""
        key = self.key(seed, *coordinates)
        return key[0] if self.tag is None else int(np.random.SeedSequence(key).generate_state(1)[0])


STREAMS = (
    TEST_SPLIT := Stream("test split", None, (), "data.seed", "numpy"),  # datasets without a test split
    MODEL_INIT := Stream("model init", None, (), "seed", "seed"),  # the round-0 global model (torch)
    PARTITION_DIRICHLET := Stream("Dirichlet partition", 1, (), "data.seed", "numpy"),  # label-skewed shards
    HOLDOUT := Stream("holdout", 2, ("client",), "data.seed", "numpy"),  # each shard's held-out part
    BATCHES := Stream("batches", 3, ("client", "round"), "seed", "numpy"),  # a client's batches in a round
    CLIENT_SAMPLING := Stream("client sampling", 4, ("round",), "seed", "numpy"),  # the round's clients
    NODE_IDS := Stream("node ids", 5, (), "seed", "numpy"),  # the inprocess engine's node ids
    PARTITION_IID := Stream("IID partition", 6, (), "data.seed", "numpy"),  # shuffled, near-equal shards
    SUBSET := Stream("subset", 7, (), "data.seed", "numpy"),  # data.max_samples
    CLIENT_TRAINING := Stream("client training", 8, ("client", "round"), "seed", "seed"),  # torch in local training
    UPDATE_NOISE := Stream("update noise", 9, ("client", "round"), "seed", "seed"),  # update-stage defenses (dp)
    DP_SGD_NOISE := Stream("DP-SGD noise", 10, ("client", "round"), "seed", "seed"),  # Opacus's noise
    FEATURE_NOISE := Stream("feature noise", 11, ("client", "round"), "seed", "seed"),  # feature-stage defenses
    # Flower's client mods draw from NumPy's global RNG (LocalDpMod's noise, SecAgg+'s stochastic rounding)
    CLIENT_MODS := Stream("client mods", 12, ("client", "round"), "seed", "seed"),
    # every observation attack's random start (shared: attacks on one client start from the same draws)
    ATTACK_START := Stream("attack start", 13, ("restart", "round", "client"), "attack seed", "seed"),
    NEAREST_DRAWS := Stream("nearest draws", 14, ("round",), "seed", "numpy"),  # TLDR's size-matched subsets
    GENERATOR_INIT := Stream("generator init", 15, (), "attack seed", "seed"),  # TLDR: torch (weights, dropout)
    GENERATOR_DRAWS := Stream("generator draws", 16, (), "attack seed", "seed"),  # TLDR: labels, latents, noise
    # a prior-only baseline's unrelated test-split batch (fl_sim.leakage.baseline), and its defenses' noise
    BASELINE_BATCH := Stream("baseline batch", 17, ("client", "round"), "seed", "numpy"),
    BASELINE_NOISE := Stream("baseline noise", 18, ("client", "round"), "seed", "seed"),
    # the random input on which a model's replicas are checked against the model (attacks/replicas.py)
    REPLICA_CHECK := Stream("replica check", 19, (), "attack seed", "seed"),
)


@contextmanager
def numpy_global(seed: int) -> Iterator[None]:
    """NumPy's global RNG seeded with ``seed`` inside the block and restored after it — for library code that
    draws from it (Flower's client mods)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
