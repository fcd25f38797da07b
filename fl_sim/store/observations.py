"""Observations in a run folder: safetensors for tensors, JSON for the rest (safe loading, no pickle)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from fl_sim.base.atomic import save_tensors, write_text
from fl_sim.observation import Normalization, Observation, ProtocolMeta, SharedFeatures
from fl_sim.store.layout import RunLayout


def save_global_state(layout: RunLayout, server_round: int, state: dict[str, torch.Tensor]) -> None:
    layout.observations(server_round).mkdir(parents=True, exist_ok=True)
    save_tensors(state, layout.global_state(server_round))


def save_observation(layout: RunLayout, obs: Observation) -> None:
    """The update, the shared features (if any) and the rest as JSON; the global state is saved once per round."""
    layout.observations(obs.server_round).mkdir(parents=True, exist_ok=True)
    save_tensors(obs.update, layout.observation(obs.server_round, obs.client))
    if obs.features is not None:
        save_tensors({"values": obs.features.values, "indices": obs.features.indices},
                     layout.observation(obs.server_round, obs.client, "features"))
    info = {"server_round": obs.server_round, "client": obs.client, "kind": obs.kind, "meta": asdict(obs.meta),
            "normalization": asdict(obs.normalization), "num_classes": obs.num_classes,
            "image_shape": list(obs.image_shape), "extras": obs.extras,
            "features_dim": obs.features.dim if obs.features is not None else None}
    write_text(layout.observation(obs.server_round, obs.client, "json"), json.dumps(info, indent=1))


def load_observations(root: Path, rounds: set[int] | None = None, clients: set[int] | None = None
                      ) -> Iterator[Observation]:
    """Observations saved in a run folder, by round then client."""
    layout = RunLayout(Path(root))
    for server_round in layout.observed_rounds():
        if rounds is not None and server_round not in rounds:
            continue
        global_state = load_file(str(layout.global_state(server_round)))
        for client in layout.observation_clients(server_round):
            if clients is not None and client not in clients:
                continue
            info = json.loads(layout.observation(server_round, client, "json").read_text())
            features = None
            if info.get("features_dim"):
                shared = load_file(str(layout.observation(server_round, client, "features")))
                features = SharedFeatures(shared["values"], shared["indices"], int(info["features_dim"]))
            yield Observation(
                server_round=info["server_round"], client=info["client"], kind=info["kind"],
                global_state=global_state, update=load_file(str(layout.observation(server_round, client))),
                meta=ProtocolMeta(**info["meta"]),
                normalization=Normalization(**{k: tuple(v) for k, v in info["normalization"].items()}),
                num_classes=info["num_classes"], image_shape=tuple(info["image_shape"]), extras=info["extras"],
                features=features)
