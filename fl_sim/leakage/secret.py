"""Secret: a client's private batch in one round — simulation-only ground truth for scoring.

The client reports the dataset indices it used on an evaluation-only channel
(:func:`fl_sim.federation.protocol.evaluation_record`); the curious strategy strips that record from the
reply before it builds the Observation, and the leakage stage keeps the batches here. Only
:mod:`fl_sim.leakage` imports this module (an import contract checks it); attacks cannot reach it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from fl_sim.base.atomic import write_text
from fl_sim.data.images import ImageSet
from fl_sim.federation.protocol import Batches
from fl_sim.store.layout import RunLayout


@dataclass(frozen=True)
class Secret:
    """``batches``: the dataset indices the client used, one array per local step, in order."""

    server_round: int
    client: int
    batches: Batches

    def examples(self, pool: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Every distinct example the client used (all steps; local epochs revisit them), in the order of first
        use: images (N, C, H, W) in [0, 1], labels (N,)."""
        return pool.batch(first_use(self.batches))


def first_use(batches: Batches) -> np.ndarray:
    """The distinct indices of ``batches`` (one array per step), in the order they are first used."""
    used = np.concatenate(batches) if len(batches) else np.zeros(0, dtype=np.int64)
    return np.asarray(list(dict.fromkeys(used.tolist())), dtype=np.int64)


class SecretLedger:
    """Secrets of a run on disk: one JSON file per round, {client: [[indices per step], ...]}."""

    def __init__(self, layout: RunLayout) -> None:
        self.layout = layout

    def add(self, secret: Secret) -> None:
        path = self.layout.secrets(secret.server_round)
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = json.loads(path.read_text()) if path.exists() else {}
        entries[str(secret.client)] = [b.tolist() for b in secret.batches]
        write_text(path, json.dumps(entries))

    def get(self, server_round: int, client: int) -> Secret:
        entries = json.loads(self.layout.secrets(server_round).read_text())
        return Secret(server_round, client, tuple(np.asarray(b, dtype=np.int64) for b in entries[str(client)]))
