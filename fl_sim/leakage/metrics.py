"""Leakage metrics: a Reconstruction scored against the Secret, on [0, 1] images with data_range 1.

Every image metric takes ``rec, gt``: (N, C, H, W) tensors in [0, 1] already paired one-to-one
(:func:`fl_sim.leakage.scoring.pair`), and returns N per-image values. PSNR / SSIM / MSE are scikit-image's; AVD follows
its authors' reference code (tested against its outputs); LPIPS is the ``lpips`` package with a real AlexNet
backbone (fl_sim.leakage.lpips_model), or unavailable with the reason. scikit-image (and scipy with it) is imported
when a metric is computed: validating a scenario's metric names (every ClientApp process does) needs only the registry.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from fl_sim.base.registry import Registry
from fl_sim.leakage.lpips_model import LpipsUnavailable, lpips_model


class MetricUnavailable(Exception):
    """A metric that cannot be computed on this machine; the message says why and how to fix it."""


@dataclass(frozen=True)
class Metric:
    """A leakage score. Image metrics have ``fn(rec, gt)`` → per-image values; label accuracy (``fn`` None) is
    scored from the recovered labels (:func:`label_accuracy`). The registry's order is the report's order."""

    fn: Callable[[torch.Tensor, torch.Tensor], np.ndarray] | None
    higher_is_better: bool
    description: str
    label: str  # axis / column label with unit
    spec: str = ".3f"  # format of a value in tables
    caption: str = ""  # the short form under an image, "{}" for the value ("" : not shown)
    plotted: bool = True  # a panel of the leakage-over-rounds figure
    provenance: Callable[[torch.Tensor], str] | None = None  # what a value on these images rests on (the note)

    @property
    def image(self) -> bool:
        return self.fn is not None


METRICS: Registry[Metric] = Registry("metric")


def _check(rec: torch.Tensor, gt: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    if rec.shape != gt.shape or rec.ndim != 4:
        raise ValueError(f"expected paired (N, C, H, W) batches of one shape, got {tuple(rec.shape)} vs "
                         f"{tuple(gt.shape)}")
    for name, t in (("reconstruction", rec), ("ground truth", gt)):
        if not torch.isfinite(t).all() or float(t.min()) < 0 or float(t.max()) > 1:
            raise ValueError(f"{name} must be finite and in [0, 1] (range {float(t.min()):.3g}..{float(t.max()):.3g})")
    return rec.detach().cpu().double().numpy(), gt.detach().cpu().double().numpy()


def psnr(rec: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    from skimage.metrics import peak_signal_noise_ratio

    r, g = _check(rec, gt)
    return np.array([peak_signal_noise_ratio(gi, ri, data_range=1.0) for ri, gi in zip(r, g, strict=True)])


def ssim_window(height: int, width: int) -> int:
    """scikit-image's 7×7 window, or the largest odd window that fits a smaller image."""
    side = min(7, height, width)
    return side if side % 2 else side - 1


def ssim(rec: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    from skimage.metrics import structural_similarity

    r, g = _check(rec, gt)
    win = ssim_window(*r.shape[-2:])
    return np.array([structural_similarity(gi, ri, data_range=1.0, channel_axis=0, win_size=win)
                     for ri, gi in zip(r, g, strict=True)])


def mse(rec: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    from skimage.metrics import mean_squared_error

    r, g = _check(rec, gt)
    return np.array([mean_squared_error(gi, ri) for ri, gi in zip(r, g, strict=True)])


def to_8bit(x: torch.Tensor) -> torch.Tensor:
    """(…, H, W) in [0, 1] as torchvision's ToPILImage + ToTensor leave it: ``mul(255).byte()`` in float32 (which
    truncates), then / 255 — what AVD's reference code does to both images. float64 result."""
    return (x.detach().cpu().float() * 255).to(torch.uint8).double() / 255


def variation_maps(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First- and second-order absolute variation maps of (…, C, H, W) images (the AVD authors' T1, T2)."""
    dx, dy = v[..., :, :-1] - v[..., :, 1:], v[..., :-1, :] - v[..., 1:, :]
    d2x, d2y = dx[..., :, :-1] - dx[..., :, 1:], dy[..., :-1, :] - dy[..., 1:, :]
    return (dx[..., 1:, :] + dy[..., :, 1:]).abs(), (d2x[..., 2:, :] + d2y[..., :, 2:]).abs()


def avd(rec: torch.Tensor, gt: torch.Tensor, c1: float = 1.0, c2: float = 0.5) -> np.ndarray:
    """Absolute Variation Distance as its authors' reference code computes it (lower is better).

    Both images go through ToPILImage (8 bits, truncated; the reconstruction as |rec|); then
    AVD = sqrt(c1·mean((T1(rec) − T1(gt))²) + c2·mean((T2(rec) − T2(gt))²)) per image.
    """
    _check(rec, gt)
    (t1r, t2r), (t1g, t2g) = variation_maps(to_8bit(rec.abs())), variation_maps(to_8bit(gt))
    return torch.sqrt(c1 * (t1r - t1g).pow(2).flatten(1).mean(1) + c2 * (t2r - t2g).pow(2).flatten(1).mean(1)).numpy()


LPIPS_MIN_SIDE = 32  # AlexNet's pooling needs ≥ 32 px (at 28 px the second pool has no output)


def _lpips_input(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [0, 1] as LPIPS takes it: 3 channels (grayscale repeated), at least 32 px (bilinear)."""
    x = x.float().cpu()
    x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
    if min(x.shape[-2:]) < LPIPS_MIN_SIDE:
        scale = LPIPS_MIN_SIDE / min(x.shape[-2:])
        size = [max(LPIPS_MIN_SIDE, round(s * scale)) for s in x.shape[-2:]]
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1)
    return x


def lpips_distance(rec: torch.Tensor, gt: torch.Tensor) -> np.ndarray:
    """LPIPS (AlexNet, ``normalize=True`` for [0, 1] input) on :func:`_lpips_input` of both images."""
    _check(rec, gt)
    try:
        model = lpips_model().net
    except LpipsUnavailable as err:
        raise MetricUnavailable(f"LPIPS has no AlexNet backbone here ({err})") from None
    with torch.no_grad():
        values = model(_lpips_input(rec), _lpips_input(gt), normalize=True)
    return values.flatten().double().numpy()


def lpips_backbone(images: torch.Tensor) -> str:
    """The LPIPS rows' note: the backbone's source, and the upsampling of images under 32 px."""
    note = f"backbone: {lpips_model().source}"
    h, w = images.shape[-2:]
    if min(h, w) < LPIPS_MIN_SIDE:
        note += f"; {h}×{w} images upsampled to {tuple(_lpips_input(images[:1]).shape[-2:])} (bilinear)"
    return note


METRICS.add("psnr", Metric(psnr, True, "peak signal-to-noise ratio, dB (scikit-image, data_range 1)", "PSNR (dB)",
                           ".2f", "PSNR {} dB"))
METRICS.add("ssim", Metric(ssim, True, "structural similarity (scikit-image, data_range 1)", "SSIM", caption="SSIM {}"))
METRICS.add("mse", Metric(mse, False, "mean squared error on [0, 1] images", "MSE", ".2e", plotted=False))
METRICS.add("avd", Metric(avd, False, "absolute variation distance (c1 = 1, c2 = 0.5)", "AVD", caption="AVD {}"))
METRICS.add("lpips", Metric(lpips_distance, False, "LPIPS, AlexNet backbone", "LPIPS", caption="LPIPS {}",
                            provenance=lpips_backbone))
METRICS.add("label_acc", Metric(None, True, "recovered labels, multiset overlap with the true ones", "label accuracy",
                                caption="labels {}"))
SCORES = tuple(METRICS.in_order())  # every score, in report order
IMAGE_METRICS = tuple(n for n in SCORES if METRICS.get(n).image)
DEFAULT_METRICS = IMAGE_METRICS


def label_accuracy(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """Multiset overlap |ŷ ∩ y| / |y| (order does not matter)."""
    overlap = Counter(predicted.tolist()) & Counter(true.tolist())
    return sum(overlap.values()) / max(1, len(true))
