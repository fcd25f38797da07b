"""Scoring one Reconstruction against its Secret's images: pair them one-to-one, then one tidy row per metric."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from attacks import Reconstruction
from fl_sim.leakage.metrics import METRICS, MetricUnavailable, label_accuracy

Pairing = tuple[np.ndarray, np.ndarray]  # (reconstruction indices, ground-truth indices)
EMPTY_BATCH = "the client's batch was empty (Poisson sampling): no private example to recover"
UNPAIRED = "no reconstructed image was paired with this one (the attack returned fewer images)"
BASELINE = "baseline_"  # the prior-only baseline's score of metric m is the row metric = baseline_m (leakage.baseline)


def pair(rec: torch.Tensor, gt: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one assignment (Hungarian, on per-pair MSE): indices (rec_idx, gt_idx) of the pairs."""
    cost = ((rec.detach().flatten(1)[:, None].double() - gt.detach().flatten(1)[None].double()) ** 2).mean(-1)
    return linear_sum_assignment(cost.cpu().numpy())


def score(rec: Reconstruction, gt_images: torch.Tensor, gt_labels: torch.Tensor, metrics: list[str],
          pairing: Pairing | None = None) -> list[dict[str, Any]]:
    """Rows (metric, value, note) for one reconstruction; images are paired one-to-one first."""
    rows: list[dict[str, Any]] = [{"metric": "failed", "value": float(rec.failure is not None),
                                   "note": rec.failure or ""},
                                  {"metric": "iterations", "value": rec.iterations, "note": ""},
                                  {"metric": "seconds", "value": round(rec.seconds, 4), "note": ""}]
    if len(gt_images) == 0:  # a Poisson-sampled batch (DP-SGD) can be empty: the update carried noise only
        return rows + [{"metric": name, "value": math.nan, "note": EMPTY_BATCH} for name in ["label_acc", *metrics]]
    if rec.labels is not None:
        rows.append({"metric": "label_acc", "value": label_accuracy(rec.labels, gt_labels), "note": ""})
    if rec.failure is not None:
        return rows + [row for name in metrics for row in per_image(name, {}, len(gt_images), "", rec.failure)]
    ri, gi = pairing if pairing is not None else pair(rec.images, gt_images)
    rec_p, gt_p = rec.images[ri], gt_images[gi]
    for name in metrics:
        metric = METRICS.get(name)
        try:
            values = np.asarray(metric.fn(rec_p, gt_p), dtype=float)
            note = metric.provenance(gt_p) if metric.provenance is not None else ""
        except MetricUnavailable as err:
            rows.append({"metric": name, "value": math.nan, "note": f"unavailable: {err}"})
            continue
        rows.append({"metric": name, "value": float(values.mean()), "note": note})
        rows += per_image(name, dict(zip(gi.tolist(), values.tolist(), strict=True)), len(gt_images), note)
    return rows


def per_image(metric: str, values: dict[int, float], count: int, note: str, missing: str = UNPAIRED
              ) -> list[dict[str, Any]]:
    """One row per ground-truth image (``image`` = its index in the Secret's batch): its paired reconstruction's
    score, NaN (note ``missing``) for an image no reconstruction was paired with."""
    return [{"metric": metric, "value": values.get(i, math.nan), "note": note if i in values else missing,
             "image": i} for i in range(count)]
