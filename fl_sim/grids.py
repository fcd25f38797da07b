"""Per-round PNG grids: ground truth in the first row, then one row per attack."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.utils import make_grid


def save_grid(rows: list[torch.Tensor], path: Path, min_side: int = 64) -> None:
    """``rows``: equal-length (N, C, H, W) batches in [0, 1]; small images are upscaled (nearest)."""
    n = rows[0].shape[0]
    images = torch.cat([r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows])
    scale = max(1, -(-min_side // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images.clamp(0, 1), nrow=n, padding=2, pad_value=1.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")).save(tmp)
    tmp.replace(path)
