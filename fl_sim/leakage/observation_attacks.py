"""Attacks on a round's Observations, scored against the Secrets → tidy rows, reconstructions and grids.

This is where attack output meets the Secret. Attacks receive Observations only; an attack that is an
oracle ablation (true labels) gets them through an explicit argument and its rows are flagged
``label_strategy = oracle``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attacks import ATTACKS, ObservationAttack, Reconstruction, Target, build_attack
from defenses import defense_label
from fl_sim.base.atomic import atomic_path, save_tensors
from fl_sim.leakage.baseline import uninformative
from fl_sim.leakage.grids import round_grid
from fl_sim.leakage.scoring import BASELINE, Pairing, pair, score
from fl_sim.leakage.secret import Batches, Secret, SecretLedger
from fl_sim.observation import Observation
from fl_sim.scenario import ComponentSpec, Scenario
from fl_sim.store import RunStore

if TYPE_CHECKING:
    from fl_sim.federation.setup import Federation

log = logging.getLogger("fl_sim")


@dataclass(frozen=True)
class NamedAttack:
    name: str
    attack: ObservationAttack


class LeakageRunner:
    """Keeps each round's Secrets and runs the scenario's observation attacks (or ``specs``) at the end of the
    round; rows go to results.csv."""

    def __init__(self, scenario: Scenario, fed: Federation, store: RunStore,
                 specs: list[ComponentSpec] | None = None) -> None:
        self.scenario, self.fed, self.store = scenario, fed, store
        self.secrets = SecretLedger(store.layout)
        self.defense = defense_label(scenario.defenses)
        self.attacks = [NamedAttack(spec.shown, build_attack(spec.name, spec.params))
                        for spec in (scenario.attacks if specs is None else specs)
                        if ATTACKS.get(spec.name).target == Target.OBSERVATION]

    def keep(self, server_round: int, batches: dict[int, Batches]) -> None:
        """The batches each observed client used (the simulation's evaluation-only record), as Secrets."""
        for client, used in batches.items():
            self.secrets.add(Secret(server_round, client, used))

    def __call__(self, server_round: int, observations: list[Observation]) -> None:
        attacked = [o for o in observations if self.scenario.attacked(server_round, o.client)]
        if not attacked or not self.attacks:
            return
        rows: list[dict[str, Any]] = []
        truth = {o.client: self.secrets.get(server_round, o.client).examples(self.fed.data.train) for o in attacked}
        batched = {named.name: self._reconstruct_many(named, attacked) for named in self.attacks}
        for obs in attacked:
            gt_images, gt_labels = truth[obs.client]
            unrelated = self._uninformative(obs)
            for named in self.attacks:
                rec = batched[named.name].get(obs.client) or self._reconstruct(named, obs, gt_labels)
                if rec.failure:
                    log.warning("round %d client %d: %s failed: %s", server_round, obs.client, named.name, rec.failure)
                pairing = pair(rec.images, gt_images) if rec.failure is None and len(rec.images) else None
                self._save(server_round, obs.client, named.name, rec, gt_images, pairing)
                base = {"round": server_round, "client": obs.client, "attack": named.name, "defense": self.defense,
                        "label_strategy": rec.label_strategy}
                rows += [base | row for row in score(rec, gt_images, gt_labels, self.scenario.metrics, pairing)]
                if unrelated is not None:
                    rows += [base | row for row in self._baseline(named, *unrelated, gt_images, gt_labels)]
        self.store.append_results(rows)
        self.write_grid(server_round)

    def _uninformative(self, obs: Observation) -> tuple[Observation, torch.Tensor] | None:
        """The baseline's observation of this client (and its batch's labels), or None: baselines off, or a
        secure aggregate (client -1), whose update is no one client's."""
        if not self.scenario.threat_model.baseline or obs.client < 0:
            return None
        return uninformative(obs, self.fed)

    def _baseline(self, named: NamedAttack, obs: Observation, labels: torch.Tensor, gt_images: torch.Tensor,
                  gt_labels: torch.Tensor) -> list[dict[str, Any]]:
        """The attack on the uninformative observation, scored against the client's real batch: rows
        ``baseline_<metric>`` (and ``baseline_failed``)."""
        rec = self._reconstruct(named, obs, labels)
        if rec.failure:
            log.warning("round %d client %d: %s's prior-only baseline failed: %s", obs.server_round, obs.client,
                        named.name, rec.failure)
        rows = score(rec, gt_images, gt_labels, self.scenario.metrics)
        return [row | {"metric": f"{BASELINE}{row['metric']}"} for row in rows
                if row["metric"] not in ("iterations", "seconds")]

    def _reconstruct_many(self, named: NamedAttack, attacked: list[Observation]) -> dict[int, Reconstruction]:
        """client → reconstruction, for attacks that solve a round's clients as one batch (else empty:
        they run one by one). A batch that raises falls back to one by one."""
        attack = named.attack
        if not attack.batches_clients or attack.needs_oracle_labels or len(attacked) < 2:
            return {}
        try:
            return {o.client: rec for o, rec in zip(attacked, attack.reconstruct_many(attacked, self.fed.model()),
                                                    strict=True)}
        except Exception:  # noqa: BLE001 - the one-by-one path records each client's own failure
            log.exception("round %d: batched %s raised; attacking the clients one by one",
                          attacked[0].server_round, named.name)
            return {}

    def _reconstruct(self, named: NamedAttack, obs: Observation, gt_labels: torch.Tensor) -> Reconstruction:
        """An attack that raises is a failed attack (traceback in run.log), not a failed run."""
        oracle = gt_labels if named.attack.needs_oracle_labels else None
        try:
            return named.attack.reconstruct(obs, self.fed.model(), oracle)
        except Exception as err:  # noqa: BLE001 - any attack bug or resource error
            log.exception("round %d client %d: %s raised", obs.server_round, obs.client, named.name)
            return Reconstruction(torch.zeros(0, *obs.image_shape), None, "", failure=f"{type(err).__name__}: {err}")

    def _save(self, server_round: int, client: int, attack: str, rec: Reconstruction, gt: torch.Tensor,
              pairing: Pairing | None) -> None:
        """The reconstruction ordered like the ground truth (and the ground truth) for grids and reports."""
        path = self.store.layout.reconstruction(server_round, attack, client)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"ground_truth": gt}
        if pairing is not None:
            ri, gi = pairing
            ordered = torch.zeros_like(gt)
            ordered[torch.as_tensor(gi)] = rec.images[torch.as_tensor(ri)]
            tensors["images"] = ordered
        if rec.labels is not None:
            tensors["labels"] = rec.labels
        save_tensors(tensors, path)

    def write_grid(self, server_round: int) -> Path | None:
        """The round's grid from every reconstruction of the round on disk (failed ones left gray)."""
        picture = round_grid(self.store.layout, server_round)
        if picture is None:
            return None
        out = self.store.layout.round_grid(server_round)
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            picture.save(tmp)
        return out
