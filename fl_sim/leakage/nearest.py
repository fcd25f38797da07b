"""All-pairs image similarity for nearest-neighbour search (TLDR's train-vs-test evaluation).

``pairwise_ssim(a, b)`` and ``pairwise_avd(a, b)`` take (M, C, H, W) and (T, C, H, W) batches in
[0, 1] and return (M, T) matrices equal to ``fl_sim.leakage.metrics.ssim`` / ``avd`` on every pair (tested
against them): SSIM as scikit-image computes it (7×7 uniform window, sample covariance, K1 0.01,
K2 0.03, data_range 1, border of 3 pixels cropped, mean over channels); AVD as a Euclidean distance
between weighted first- and second-order variation maps of the 8-bit images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_sim.leakage.metrics import ssim_window, to_8bit, variation_maps

K1, K2 = 0.01, 0.03


def _local_stats(x: torch.Tensor, win: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Window means of x and x² over the valid (border-cropped) region: (N, C, H − win + 1, W − win + 1)."""
    return F.avg_pool2d(x, win, stride=1), F.avg_pool2d(x * x, win, stride=1)


def pairwise_ssim(a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """(M, T) SSIM of every a_i against every b_j (float64)."""
    a, b = a.double(), b.double()
    win = ssim_window(*a.shape[-2:])
    cov_norm = win * win / (win * win - 1)
    c1, c2 = K1**2, K2**2
    mu_a, sq_a = _local_stats(a, win)
    var_a = cov_norm * (sq_a - mu_a**2)
    out = torch.empty(len(a), len(b), dtype=torch.float64)
    for start in range(0, len(b), chunk):
        bj = b[start:start + chunk]
        mu_b, sq_b = _local_stats(bj, win)
        var_b = cov_norm * (sq_b - mu_b**2)
        prod = a[:, None] * bj[None]  # (M, t, C, H, W)
        m, t = prod.shape[:2]
        mu_ab = F.avg_pool2d(prod.flatten(0, 1), win, stride=1).unflatten(0, (m, t))
        cov = cov_norm * (mu_ab - mu_a[:, None] * mu_b[None])
        num = (2 * mu_a[:, None] * mu_b[None] + c1) * (2 * cov + c2)
        den = (mu_a[:, None] ** 2 + mu_b[None] ** 2 + c1) * (var_a[:, None] + var_b[None] + c2)
        out[:, start:start + len(bj)] = (num / den).mean(dim=(2, 3, 4))
    return out


def _avd_features(x: torch.Tensor, c1: float = 1.0, c2: float = 0.5) -> torch.Tensor:
    """(N, D): √(c1/n1)·T1 ‖ √(c2/n2)·T2 of the images as AVD sees them, so AVD(a, b) = ‖f(a) − f(b)‖."""
    t1, t2 = (t.flatten(1) for t in variation_maps(to_8bit(x.abs())))
    return torch.cat([t1 * (c1 / t1.shape[1]) ** 0.5, t2 * (c2 / t2.shape[1]) ** 0.5], dim=1)


def pairwise_avd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(M, T) AVD of every a_i against every b_j (float64; lower is more similar)."""
    fa, fb = _avd_features(a), _avd_features(b)
    sq = (fa**2).sum(1)[:, None] + (fb**2).sum(1)[None] - 2 * fa @ fb.T
    return sq.clamp_min(0).sqrt()
