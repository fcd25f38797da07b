"""Observation: what the honest-but-curious server legitimately sees of one client in one round.

Attacks receive only Observations (and the model architecture the server itself built). Nothing
here can reach a client's private batch: that lives in :mod:`fl_sim.secret`, which attacks never
import (a test checks this).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file

from fl_sim.atomic import save_tensors, write_text
from fl_sim.data.images import Normalization
from fl_sim.features import SharedFeatures

UpdateKind = Literal["gradient", "weights"]


@dataclass(frozen=True)
class ProtocolMeta:
    """The protocol metadata a client reports with its update (all of it visible to the server)."""

    protocol: str  # "fedsgd" | "fedavg"
    num_examples: int  # weight the client claims for aggregation
    batch_size: int  # size of its (first) local batch
    local_steps: int  # optimizer steps taken
    lr: float
    optimizer: str
    momentum: float  # local optimizer settings the server instructed
    weight_decay: float
    batchnorm: str  # "train" | "eval" during local training
    train_loss: float


@dataclass(frozen=True)
class Observation:
    """One client's reply in one round, with the global state the server sent it.

    ``global_state`` / ``update``: name → tensor (the model's state-dict names). For ``kind =
    "gradient"`` (FedSGD) the update holds ∂loss/∂θ for parameters and the client's buffers after
    its forward pass; for ``"weights"`` (FedAvg) the client's full state after local training.
    """

    server_round: int
    client: int
    kind: UpdateKind
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    meta: ProtocolMeta
    normalization: Normalization
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W) the model takes
    extras: dict[str, str] = field(default_factory=dict)
    features: SharedFeatures | None = None  # pruned penultimate features, when the scenario shares them


def round_dir(root: Path, server_round: int) -> Path:
    return root / "observations" / f"round-{server_round:04d}"


def save_global_state(root: Path, server_round: int, state: dict[str, torch.Tensor]) -> None:
    folder = round_dir(root, server_round)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(state, folder / "global.safetensors")


def save_observation(root: Path, obs: Observation) -> None:
    """observations/round-RRRR/client-CCCC.{safetensors,json}; the global state is saved once per round."""
    folder = round_dir(root, obs.server_round)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"client-{obs.client:04d}"
    save_tensors(obs.update, stem.with_suffix(".safetensors"))
    if obs.features is not None:
        save_tensors({"values": obs.features.values, "indices": obs.features.indices},
                     stem.with_suffix(".features.safetensors"))
    info = {"server_round": obs.server_round, "client": obs.client, "kind": obs.kind, "meta": asdict(obs.meta),
            "normalization": asdict(obs.normalization), "num_classes": obs.num_classes,
            "image_shape": list(obs.image_shape), "extras": obs.extras,
            "features_dim": obs.features.dim if obs.features is not None else None}
    write_text(stem.with_suffix(".json"), json.dumps(info, indent=1))


def load_observations(root: Path, rounds: set[int] | None = None, clients: set[int] | None = None
                      ) -> Iterator[Observation]:
    """Observations saved in a run folder (safe loading: safetensors + JSON), by round then client."""
    for folder in sorted((Path(root) / "observations").glob("round-*")):
        server_round = int(folder.name.split("-")[1])
        if rounds is not None and server_round not in rounds:
            continue
        global_file = folder / "global.safetensors"
        if not global_file.exists():
            continue
        global_state = load_file(str(global_file))
        for meta_file in sorted(folder.glob("client-*.json")):
            info = json.loads(meta_file.read_text())
            if clients is not None and info["client"] not in clients:
                continue
            features = None
            if info.get("features_dim"):
                shared = load_file(str(meta_file.with_suffix(".features.safetensors")))
                features = SharedFeatures(shared["values"], shared["indices"], int(info["features_dim"]))
            yield Observation(
                server_round=info["server_round"], client=info["client"], kind=info["kind"],
                global_state=global_state, update=load_file(str(meta_file.with_suffix(".safetensors"))),
                meta=ProtocolMeta(**info["meta"]),
                normalization=Normalization(**{k: tuple(v) for k, v in info["normalization"].items()}),
                num_classes=info["num_classes"], image_shape=tuple(info["image_shape"]), extras=info["extras"],
                features=features)

