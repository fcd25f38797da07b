"""Model attacks (TLDR) on the global model the server holds after each attacked round, and their evaluation.

The paper reports no metric; ours: for every generated image, its nearest real image among the
federation's training data (the pooled client shards) and among the held-out test data, by SSIM
(higher = nearer) and AVD (lower = nearer). The training pool is much larger than the test pool, and
a maximum over more images is larger by chance alone, so the training-side distance is the mean
over ``DRAWS`` random training subsets of the test pool's size. "Training-like" = nearer to training
than to test data: the gap (train − test SSIM, test − train AVD) is > 0. Rows go to inversion.csv
(run, round, attack, class, metric, value, note; class "all" = every generated image), images to
inversions/round-RRRR/<attack>.safetensors, a per-class grid (each generated image above its nearest
training image) to grids/.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from attacks import ATTACKS, Inversion, Target, build_attack
from fl_sim.base.atomic import atomic_path, save_tensors
from fl_sim.base.streams import NEAREST_DRAWS
from fl_sim.leakage.grids import grid_image
from fl_sim.leakage.metrics import MetricUnavailable, lpips_backbone, lpips_distance
from fl_sim.leakage.nearest import pairwise_avd, pairwise_ssim
from fl_sim.scenario import ComponentSpec, Scenario
from fl_sim.store import RunStore

if TYPE_CHECKING:
    from fl_sim.federation.setup import Federation

log = logging.getLogger("fl_sim")
DRAWS = 10


def nearest(generated: torch.Tensor, train: torch.Tensor, test: torch.Tensor, rng: np.random.Generator
            ) -> dict[str, np.ndarray]:
    """Per generated image (M,): nearest-neighbour SSIM / AVD to the training pool (size-matched draws) and the
    test pool, and the index of its nearest training image in the whole pool (by SSIM)."""
    ssim_train, ssim_test = pairwise_ssim(generated, train), pairwise_ssim(generated, test)
    avd_train, avd_test = pairwise_avd(generated, train), pairwise_avd(generated, test)
    draws = [torch.as_tensor(rng.choice(len(train), size=min(len(test), len(train)), replace=False))
             for _ in range(DRAWS)]
    return {"nn_train_ssim": torch.stack([ssim_train[:, d].amax(1) for d in draws]).mean(0).numpy(),
            "nn_test_ssim": ssim_test.amax(1).numpy(),
            "nn_train_avd": torch.stack([avd_train[:, d].amin(1) for d in draws]).mean(0).numpy(),
            "nn_test_avd": avd_test.amin(1).numpy(),
            "nearest_train": ssim_train.argmax(1).numpy(), "nearest_test": ssim_test.argmax(1).numpy()}


def inversion_rows(inv: Inversion, found: dict[str, np.ndarray], train_labels: np.ndarray,
                   lpips: dict[str, np.ndarray], lpips_note: str) -> list[dict[str, Any]]:
    """Tidy rows (class, metric, value, note) per conditioned class and for "all"."""
    labels = inv.labels.numpy()
    per_image = {
        "confidence": inv.confidence.numpy(),
        "predicted_as_conditioned": (inv.predicted == inv.labels).double().numpy(),
        **{k: found[k] for k in ("nn_train_ssim", "nn_test_ssim", "nn_train_avd", "nn_test_avd")},
        "ssim_gap": found["nn_train_ssim"] - found["nn_test_ssim"],
        "avd_gap": found["nn_test_avd"] - found["nn_train_avd"],
        "train_closer": (found["nn_train_ssim"] > found["nn_test_ssim"]).astype(float),
        "nn_label_match": (train_labels[found["nearest_train"]] == labels).astype(float),
        **lpips,
    }
    rows = []
    for cls in [*map(str, np.unique(labels)), "all"]:
        mask = np.ones_like(labels, bool) if cls == "all" else labels == int(cls)
        for metric, values in per_image.items():
            note = lpips_note if metric.startswith("lpips") else ""
            rows.append({"class": cls, "metric": metric, "value": float(np.mean(values[mask])), "note": note})
    return rows


class InversionRunner:
    """Runs the scenario's model attacks on the global model after every attacked round."""

    def __init__(self, scenario: Scenario, fed: Federation, store: RunStore,
                 specs: list[ComponentSpec] | None = None) -> None:
        self.scenario, self.fed, self.store = scenario, fed, store
        self.attacks = [(spec.shown, build_attack(spec.name, spec.params)) for spec in specs or scenario.attacks
                        if ATTACKS.get(spec.name).target == Target.GLOBAL_MODEL]
        if self.attacks:
            pool = np.concatenate(fed.shards)
            self.train, self.train_labels = fed.data.train.images(pool), np.asarray(fed.data.train.labels)[pool]
            self.test = fed.data.test.images(np.arange(len(fed.data.test)))

    def __call__(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        tm = self.scenario.threat_model
        if tm.rounds == "all" or server_round in tm.rounds:
            self.run(server_round, state)

    def run(self, server_round: int, state: dict[str, torch.Tensor]) -> None:
        """Every model attack on ``state`` (the global model after ``server_round``)."""
        model = self.fed.model()
        model.load_state_dict(state)
        for name, attack in self.attacks:
            try:
                inv = attack.invert(model, self.fed.norm, self.fed.data.num_classes, self.fed.data.shape)
            except Exception as err:  # noqa: BLE001 - a failed attack, not a failed run
                log.exception("round %d: %s raised", server_round, name)
                self._append(server_round, name, [{"class": "all", "metric": "failed", "value": 1.0,
                                                   "note": f"{type(err).__name__}: {err}"}])
                continue
            self._record(server_round, name, inv)

    def _record(self, server_round: int, name: str, inv: Inversion) -> None:
        rows = [{"class": "all", "metric": "failed", "value": float(inv.failure is not None),
                 "note": inv.failure or ""},
                {"class": "all", "metric": "steps", "value": inv.steps, "note": ""},
                {"class": "all", "metric": "seconds", "value": round(inv.seconds, 3), "note": ""}]
        if inv.failure is not None:
            log.warning("round %d: %s failed: %s", server_round, name, inv.failure)
            self._append(server_round, name, rows)
            return
        found = nearest(inv.images, self.train, self.test, NEAREST_DRAWS.rng(self.scenario.seed, server_round))
        try:
            lpips = {"lpips_train": lpips_distance(inv.images, self.train[found["nearest_train"]]),
                     "lpips_test": lpips_distance(inv.images, self.test[found["nearest_test"]])}
            note = lpips_backbone(inv.images)
        except MetricUnavailable as err:
            lpips, note = {"lpips_train": np.full(len(inv.images), math.nan)}, f"unavailable: {err}"
        self._append(server_round, name, rows + inversion_rows(inv, found, self.train_labels, lpips, note))
        nearest_train = self.train[found["nearest_train"]]
        layout = self.store.layout
        layout.inversions(server_round).mkdir(parents=True, exist_ok=True)
        save_tensors({"images": inv.images.contiguous(), "labels": inv.labels, "confidence": inv.confidence,
                      "nearest_train": nearest_train.contiguous()}, layout.inversion(server_round, name))
        per_class = inv.images.shape[0] // max(1, len(inv.labels.unique()))
        rows_img: list[torch.Tensor] = []
        for cls in inv.labels.unique():
            mask = inv.labels == cls
            rows_img += [inv.images[mask][:per_class], nearest_train[mask][:per_class]]
        names = [n for cls in inv.labels.unique().tolist() for n in (f"class {cls}", "nearest train")]
        layout.grids.mkdir(exist_ok=True)
        with atomic_path(layout.inversion_grid(server_round, name)) as tmp:
            grid_image(rows_img, names).save(tmp, format="png")

    def _append(self, server_round: int, name: str, rows: list[dict[str, Any]]) -> None:
        self.store.append_inversions([{"round": server_round, "attack": name} | r for r in rows])
