"""The comparison's image grids: the same clients' images reconstructed under every setting, each with its score.

A column is one attacked (round, client) of the first setting; a row is a setting. Each ground-truth image gets a
tile per setting: the reconstruction paired with it and its own score, gray only where the attack failed (the
reason on hover). Under secure aggregation the attack reconstructs the round's aggregate: the tile is the
aggregate's reconstruction paired with that image, found in the aggregate's ground truth (the union of the
cohort's batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from defenses import AGGREGATE_CLIENT
from fl_sim.leakage.grids import grid_image, load_round
from fl_sim.leakage.scoring import UNPAIRED
from fl_sim.report import tables
from fl_sim.report.images import Picture
from fl_sim.report.runs import RunData
from fl_sim.report.tables import fmt
from fl_sim.store import RunLayout


@dataclass(frozen=True)
class Tile:
    """One image of a grid row: its picture (None: nothing to show), the score under it, and why it is missing
    (``failure``: the attack failed, the tile is gray)."""

    picture: Picture | None
    caption: str
    failure: str = ""


@dataclass(frozen=True)
class SettingGrid:
    """One attack's grid; ``rows``: (setting label, every parameter, per column its tiles); ``picture``: the
    whole grid as one PNG (for Markdown)."""

    attack: str
    columns: list[str]
    truth: list[list[Picture]]
    rows: list[tuple[str, str, list[list[Tile]]]]
    picture: Picture


@dataclass(frozen=True)
class _Found:
    image: torch.Tensor | None  # (C, H, W)
    score: float
    failure: str  # the attack failed: why
    missing: str = ""  # not attacked here (no tile, not gray)


class _Saved:
    """One setting's saved reconstructions and per-image scores."""

    def __init__(self, run: RunData, metric: str) -> None:
        self.layout, self.metric = RunLayout(run.root), metric
        self.images = run.images
        recs = tables.reconstructions(run.results)
        self.failures = {(r.round, r.client, r.attack): r.failure or "failed"
                         for r in recs.itertuples(index=False) if r.failed}
        self._rounds: dict[int, dict] = {}

    def _round(self, server_round: int) -> dict:
        if server_round not in self._rounds:
            self._rounds[server_round] = load_round(self.layout, server_round)
        return self._rounds[server_round]

    def truth(self, server_round: int, attack: str, client: int) -> torch.Tensor | None:
        entry = self._round(server_round).get((attack, client))
        return None if entry is None else entry["ground_truth"]

    def find(self, server_round: int, attack: str, client: int, gt: torch.Tensor) -> list[_Found]:
        """Per ground-truth image of ``client``: what this setting reconstructed of it."""
        loaded = self._round(server_round)
        entry, owner, index = loaded.get((attack, client)), client, list(range(len(gt)))
        if entry is None and (attack, AGGREGATE_CLIENT) in loaded:
            entry, owner = loaded[(attack, AGGREGATE_CLIENT)], AGGREGATE_CLIENT
            index = [_position(entry["ground_truth"], g) for g in gt]
        if entry is None:
            return [_Found(None, math.nan, "", "not attacked in this setting")] * len(gt)
        failure = self.failures.get((server_round, owner, attack), "")
        rows = self.images
        if not rows.empty and self.metric in rows:
            rows = rows[(rows["round"] == server_round) & (rows["client"] == owner) & (rows["attack"] == attack)]
            scores = dict(zip(rows["image"], rows[self.metric], strict=True))
        else:
            scores = {}
        return [_Found(None, math.nan, failure or UNPAIRED)
                if j is None or "images" not in entry else _Found(entry["images"][j], scores.get(j, math.nan), "")
                for j in index]


def _position(batch: torch.Tensor, image: torch.Tensor) -> int | None:
    """The index of ``image`` in ``batch`` (exact copy), or None."""
    return next((i for i, b in enumerate(batch) if torch.equal(b, image)), None)


def _caption(found: _Found, metric: str) -> str:
    if found.missing:
        return "–"
    return "failed" if found.failure else fmt(metric, found.score)


def _tile(image: torch.Tensor, alt: str) -> Picture:
    return Picture.of(grid_image([image[None]], min_side=48), "", alt)


def setting_grids(settings: list[RunData], labels: list[tuple[str, str]], attacks: list[str], files: str,
                  metric: str, pairs: int = 4) -> list[SettingGrid]:
    """Per attack, the first ``pairs`` attacked (round, client) of the first setting (its aggregate if that is all
    it has); ``labels``: (label, every parameter) per setting."""
    saved = [_Saved(run, metric) for run in settings]
    recs = tables.reconstructions(settings[0].results)
    grids = []
    for attack in attacks:
        mine = recs[recs["attack"] == attack][["round", "client"]].drop_duplicates()
        keys = (mine[mine["client"] >= 0] if (mine["client"] >= 0).any() else mine).head(pairs)
        columns, truth, cells, strips = [], [], [[] for _ in settings], [[] for _ in range(len(settings) + 1)]
        for rnd, client in keys.itertuples(index=False):
            gt = next((t for s in saved if (t := s.truth(rnd, attack, client)) is not None), None)
            if gt is None or len(gt) == 0:
                continue
            name = f"round {rnd}, client {client}" if client >= 0 else f"round {rnd}, aggregate"
            columns.append(name)
            truth.append([_tile(g, f"{name}: ground truth image {i}") for i, g in enumerate(gt)])
            strips[0].append(gt)
            for row, s in enumerate(saved):
                found = s.find(rnd, attack, client, gt)
                cells[row].append([Tile(None if f.image is None else _tile(f.image, f"{labels[row][0]}, {name}"),
                                        _caption(f, metric), f.failure) for f in found])
                strips[row + 1].append(torch.stack([f.image if f.image is not None else torch.full_like(g, 0.5)
                                                    for f, g in zip(found, gt, strict=True)]))
        if not columns:
            continue
        names = ["ground truth"] + [n for n, _ in labels]
        picture = Picture.of(grid_image([torch.cat(r) for r in strips], names=names), f"{files}/{attack}.png",
                             f"{attack}: the same clients' images under every setting")
        grids.append(SettingGrid(attack, columns, truth, [(n, p, c) for (n, p), c in zip(labels, cells, strict=True)],
                                 picture))
    return grids
