"""Secret: a client's private batch in one round — simulation-only ground truth for scoring.

The client reports the dataset indices it used on an evaluation-only channel (a ConfigRecord
under :data:`SECRET_RECORD`); the curious strategy strips that record from the reply before it
builds the Observation and hands it to the SecretLedger. Attack code never imports this module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord

from fl_sim.atomic import write_text
from fl_sim.data.images import ImageSet

SECRET_RECORD = "fl-sim.secret"


@dataclass(frozen=True)
class Secret:
    """Indices into the training pool, one array per local step, in the order they were used."""

    server_round: int
    client: int
    batches: tuple[np.ndarray, ...]

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"indices": [int(i) for b in self.batches for i in b],
                             "step-sizes": [len(b) for b in self.batches]})

    @staticmethod
    def from_record(server_round: int, client: int, record: ConfigRecord) -> Secret:
        flat = np.asarray(record["indices"], dtype=np.int64)
        cuts = np.cumsum(record["step-sizes"])[:-1]
        return Secret(server_round, client, tuple(np.split(flat, cuts)))

    def examples(self, pool: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
        """Every example the client used (all steps): images (N, C, H, W) in [0, 1], labels (N,)."""
        return pool.batch(np.concatenate(self.batches))


class SecretLedger:
    """Secrets of a run on disk: secrets/round-RRRR.json, {client: [[indices per step], ...]}."""

    def __init__(self, root: Path) -> None:
        self.folder = Path(root) / "secrets"

    def _file(self, server_round: int) -> Path:
        return self.folder / f"round-{server_round:04d}.json"

    def add(self, secret: Secret) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._file(secret.server_round)
        entries = json.loads(path.read_text()) if path.exists() else {}
        entries[str(secret.client)] = [b.tolist() for b in secret.batches]
        write_text(path, json.dumps(entries))

    def get(self, server_round: int, client: int) -> Secret:
        entries = json.loads(self._file(server_round).read_text())
        return Secret(server_round, client, tuple(np.asarray(b, dtype=np.int64) for b in entries[str(client)]))

    def discard_after(self, server_round: int) -> None:
        for path in self.folder.glob("round-*.json"):
            if int(path.stem.split("-")[1]) > server_round:
                path.unlink()
