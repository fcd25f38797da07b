"""Leakage: attacks on a round's Observations, scored against the Secrets → tidy rows and grids.

This is the only place where attack output meets the Secret. Attacks receive Observations only;
an ``oracle`` label strategy gets the true labels through an explicit argument and its rows are
flagged ``label_strategy = oracle``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import Attack, Reconstruction, build_attack
from defenses import defense_label
from fl_sim.atomic import atomic_path, save_tensors
from fl_sim.federation import Federation
from fl_sim.grids import round_grid
from fl_sim.inversion import is_model_attack
from fl_sim.observation import Observation
from fl_sim.scenario import ComponentSpec, Scenario
from fl_sim.scoring import METRICS, MetricUnavailable, label_accuracy, pair
from fl_sim.store import RunStore

log = logging.getLogger("fl_sim")


@dataclass(frozen=True)
class NamedAttack:
    name: str
    attack: Attack
    oracle: bool


Pairing = tuple[np.ndarray, np.ndarray]  # (reconstruction indices, ground-truth indices)


def score(rec: Reconstruction, gt_images: torch.Tensor, gt_labels: torch.Tensor, metrics: list[str],
          pairing: Pairing | None = None) -> list[dict[str, Any]]:
    """Rows (metric, value, note) for one reconstruction; images are paired one-to-one first."""
    rows: list[dict[str, Any]] = [{"metric": "failed", "value": float(rec.failure is not None),
                                   "note": rec.failure or ""},
                                  {"metric": "iterations", "value": rec.iterations, "note": ""},
                                  {"metric": "seconds", "value": round(rec.seconds, 4), "note": ""}]
    if rec.labels is not None:
        rows.append({"metric": "label_acc", "value": label_accuracy(rec.labels, gt_labels), "note": ""})
    if rec.failure is not None:
        return rows
    ri, gi = pairing if pairing is not None else pair(rec.images, gt_images)
    rec_p, gt_p = rec.images[ri], gt_images[gi]
    for name in metrics:
        try:
            value, note = float(METRICS.get(name).fn(rec_p, gt_p).mean()), ""
        except MetricUnavailable as err:
            value, note = math.nan, f"unavailable: {err}"
        rows.append({"metric": name, "value": value, "note": note})
    return rows


class LeakageRunner:
    """Runs the scenario's attacks (or ``specs``) at the end of each round; rows go to results.csv."""

    def __init__(self, scenario: Scenario, fed: Federation, store: RunStore,
                 specs: list[ComponentSpec] | None = None) -> None:
        self.scenario, self.fed, self.store = scenario, fed, store
        self.defense = defense_label(scenario.defenses)
        self.attacks = []
        for spec in scenario.attacks if specs is None else specs:
            attack = build_attack(spec.name, spec.params)
            if is_model_attack(attack):
                continue  # TLDR and the like: fl_sim.inversion
            oracle = getattr(getattr(attack, "recipe", None), "labels", "") == "oracle"
            self.attacks.append(NamedAttack(spec.name, attack, oracle))

    def __call__(self, server_round: int, observations: list[Observation]) -> None:
        targets = [o for o in observations if self.scenario.attacked(server_round, o.client)]
        if not targets or not self.attacks:
            return
        rows: list[dict[str, Any]] = []
        truth = {o.client: self.store.secrets.get(server_round, o.client).examples(self.fed.data.train)
                 for o in targets}
        batched = {named.name: self._reconstruct_many(named, targets) for named in self.attacks}
        for obs in targets:
            gt_images, gt_labels = truth[obs.client]
            for named in self.attacks:
                rec = batched[named.name].get(obs.client) or self._reconstruct(named, obs, gt_labels)
                if rec.failure:
                    log.warning("round %d client %d: %s failed: %s", server_round, obs.client, named.name, rec.failure)
                pairing = pair(rec.images, gt_images) if rec.failure is None and len(rec.images) else None
                self._save(server_round, obs.client, named.name, rec, gt_images, pairing)
                base = {"round": server_round, "client": obs.client, "attack": named.name, "defense": self.defense,
                        "label_strategy": rec.label_strategy}
                rows += [base | row for row in score(rec, gt_images, gt_labels, self.scenario.metrics, pairing)]
        self.store.append_results(rows)
        self.write_grid(server_round)

    def _reconstruct_many(self, named: NamedAttack, targets: list[Observation]) -> dict[int, Reconstruction]:
        """client → reconstruction, for attacks that solve a round's clients as one batch (else empty:
        they run one by one). A batch that raises falls back to one by one."""
        many = getattr(named.attack, "reconstruct_many", None)
        if many is None or named.oracle or len(targets) < 2:
            return {}
        try:
            return {o.client: rec for o, rec in zip(targets, many(targets, self.fed.model()), strict=True)}
        except Exception:  # noqa: BLE001 - the one-by-one path records each client's own failure
            log.exception("round %d: batched %s raised; attacking the clients one by one",
                          targets[0].server_round, named.name)
            return {}

    def _reconstruct(self, named: NamedAttack, obs: Observation, gt_labels: torch.Tensor) -> Reconstruction:
        """An attack that raises is a failed attack (traceback in run.log), not a failed run."""
        try:
            return named.attack.reconstruct(obs, self.fed.model(), gt_labels if named.oracle else None)
        except Exception as err:  # noqa: BLE001 - any attack bug or resource error
            log.exception("round %d client %d: %s raised", obs.server_round, obs.client, named.name)
            return Reconstruction(torch.zeros(0, *obs.image_shape), None, "", failure=f"{type(err).__name__}: {err}")

    def _save(self, server_round: int, client: int, attack: str, rec: Reconstruction, gt: torch.Tensor,
              pairing: Pairing | None) -> None:
        """reconstructions/round-RRRR/<attack>-client-CCCC.safetensors, ordered like the ground truth."""
        folder = self.store.root / "reconstructions" / f"round-{server_round:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"ground_truth": gt}
        if pairing is not None:
            ri, gi = pairing
            ordered = torch.zeros_like(gt)
            ordered[torch.as_tensor(gi)] = rec.images[torch.as_tensor(ri)]
            tensors["images"] = ordered
        if rec.labels is not None:
            tensors["labels"] = rec.labels
        save_tensors(tensors, folder / f"{attack}-client-{client:04d}.safetensors")

    def write_grid(self, server_round: int) -> Path | None:
        """grids/round-RRRR.png from every reconstruction of the round on disk (failed ones left gray)."""
        picture = round_grid(self.store.root / "reconstructions" / f"round-{server_round:04d}")
        if picture is None:
            return None
        out = self.store.root / "grids" / f"round-{server_round:04d}.png"
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            picture.save(tmp)
        return out
