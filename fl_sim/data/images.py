"""Image sets: real images as (B, C, H, W) float tensors in [0, 1] with integer labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from fl_sim.observation.normalization import Normalization


class ImageSet:
    """Indexable labelled images. ``images(idx)`` → (B, C, H, W) float32 in [0, 1]."""

    labels: np.ndarray  # (N,) int64
    shape: tuple[int, int, int]  # (C, H, W)

    def __len__(self) -> int:
        return len(self.labels)

    def images(self, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def batch(self, idx: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, C, H, W) in [0, 1] and labels (B,) for the given indices."""
        idx = np.asarray(idx, dtype=np.int64)
        return self.images(idx), torch.as_tensor(self.labels[idx], dtype=torch.long)


class TensorImageSet(ImageSet):
    """Images held in memory as uint8 (N, C, H, W)."""

    def __init__(self, pixels: torch.Tensor, labels: np.ndarray) -> None:
        if pixels.dtype != torch.uint8 or pixels.ndim != 4:
            raise ValueError(f"pixels must be uint8 (N, C, H, W), got {pixels.dtype} {tuple(pixels.shape)}")
        if len(pixels) != len(labels):
            raise ValueError(f"{len(pixels)} images but {len(labels)} labels")
        self.pixels = pixels
        self.labels = np.asarray(labels, dtype=np.int64)
        self.shape = tuple(pixels.shape[1:])  # type: ignore[assignment]

    def images(self, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        return self.pixels[torch.as_tensor(np.asarray(idx, dtype=np.int64))].float() / 255.0

    def subset(self, idx: np.ndarray) -> TensorImageSet:
        return TensorImageSet(self.pixels[torch.as_tensor(idx)], self.labels[idx])


class FileImageSet(ImageSet):
    """Images read lazily from files (image folders), resized and center-cropped to ``size``."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int], size: int, channels: int) -> None:
        self.paths = list(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.size, self.channels = size, channels
        self.shape = (channels, size, size)

    def images(self, idx: Sequence[int] | np.ndarray) -> torch.Tensor:
        return torch.stack([_read_image(self.paths[i], self.size, self.channels) for i in np.asarray(idx)])

    def subset(self, idx: np.ndarray) -> FileImageSet:
        return FileImageSet([self.paths[i] for i in idx], self.labels[idx], self.size, self.channels)


def _read_image(path: str, size: int, channels: int) -> torch.Tensor:
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        arr = np.asarray(im)
    return fit_images(to_uint8_nchw(arr[None]), size, channels)[0].float() / 255.0


def to_uint8_nchw(arr: np.ndarray) -> torch.Tensor:
    """(N, H, W) or (N, H, W, C) array, uint8 or float in [0, 1] → uint8 (N, C, H, W)."""
    if arr.dtype != np.uint8:
        scale = 255.0 if float(np.max(arr)) <= 1.0 else 1.0
        arr = np.clip(np.rint(arr.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    t = torch.from_numpy(np.array(arr, copy=True, order="C"))
    return t[:, None] if t.ndim == 3 else t.permute(0, 3, 1, 2).contiguous()


def fit_images(pixels: torch.Tensor, size: int | None, channels: int | None) -> torch.Tensor:
    """Convert uint8 (N, C, H, W) to ``channels`` and to ``size``×``size`` (resize shorter side, center crop)."""
    if channels is not None and pixels.shape[1] != channels:
        if channels == 3 and pixels.shape[1] == 1:
            pixels = pixels.expand(-1, 3, -1, -1).contiguous()
        elif channels == 1 and pixels.shape[1] == 3:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            pixels = (pixels.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise ValueError(f"cannot convert {pixels.shape[1]} channels to {channels}")
    h, w = pixels.shape[-2:]
    if size is None or (h == size and w == size):
        return pixels
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = F.interpolate(pixels.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    out = out[..., top : top + size, left : left + size]
    return out.round().clamp(0, 255).to(torch.uint8)


@dataclass
class DataSplits:
    """A dataset as the federation uses it: training pool (sharded over clients) and test set."""

    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    normalization: Normalization
    classes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape
