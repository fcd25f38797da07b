"""Per-round PNG grids: ground truth in the first row, then one row per attack."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from fl_sim.atomic import atomic_path


def save_grid(rows: list[torch.Tensor], path: Path, names: list[str] | None = None, min_side: int = 64) -> None:
    """``rows``: equal-length (N, C, H, W) batches in [0, 1], one per name; small images are upscaled."""
    n = rows[0].shape[0]
    images = torch.cat([r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows])
    scale = max(1, -(-min_side // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images.clamp(0, 1), nrow=n, padding=2, pad_value=1.0)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    if names:
        picture = _with_row_names(picture, names, images.shape[-2] + 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        picture.save(tmp)


def _with_row_names(picture: Image.Image, names: list[str], row_height: int) -> Image.Image:
    margin = 8 + 7 * max(len(n) for n in names)
    framed = Image.new("RGB", (picture.width + margin, picture.height), "white")
    framed.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(framed)
    for i, name in enumerate(names):
        draw.text((4, i * row_height + row_height // 2 - 5), name, fill="black")
    return framed
