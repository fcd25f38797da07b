"""Image grids: ground truth in the first row, then one row per attack."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from torchvision.utils import make_grid

from fl_sim.store.layout import RunLayout


def grid_image(rows: list[torch.Tensor], names: list[str] | None = None, min_side: int = 64) -> Image.Image:
    """Rows of equal-length (N, C, H, W) [0, 1] batches as one RGB picture, row names on the left; an empty batch
    (a DP-SGD client that sampled no example) is one blank tile."""
    if rows[0].shape[0] == 0:
        rows = [torch.ones(1, *r.shape[1:]) for r in rows]
    n = rows[0].shape[0]
    images = torch.cat([r.expand(-1, 3, -1, -1) if r.shape[1] == 1 else r for r in rows])
    scale = max(1, -(-min_side // images.shape[-1]))
    if scale > 1:
        images = F.interpolate(images, scale_factor=scale, mode="nearest")
    grid = make_grid(images.clamp(0, 1), nrow=n, padding=2, pad_value=1.0)
    picture = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    return _with_row_names(picture, names, images.shape[-2] + 2) if names else picture


def load_round(layout: RunLayout, server_round: int) -> dict[tuple[str, int], dict[str, torch.Tensor]]:
    """(attack, client) → {ground_truth, images?, labels?} of the round's saved reconstructions."""
    return {key: load_file(str(path)) for key, path in layout.reconstruction_files(server_round).items()}


def round_grid(layout: RunLayout, server_round: int) -> Image.Image | None:
    """Ground truth of every attacked client in the first row, then one row per attack (failed: gray)."""
    loaded = load_round(layout, server_round)
    if not loaded:
        return None
    clients = sorted({c for _, c in loaded})
    attacks = sorted({a for a, _ in loaded})
    truth = {c: next(t["ground_truth"] for (_, c2), t in loaded.items() if c2 == c) for c in clients}
    rows = [torch.cat([truth[c] for c in clients])]
    rows += [torch.cat([loaded.get((a, c), {}).get("images", torch.full_like(truth[c], 0.5)) for c in clients])
             for a in attacks]
    return grid_image(rows, names=["ground truth", *attacks])


def _with_row_names(picture: Image.Image, names: list[str], row_height: int) -> Image.Image:
    margin = 8 + 7 * max(len(n) for n in names)
    framed = Image.new("RGB", (picture.width + margin, picture.height), "white")
    framed.paste(picture, (margin, 0))
    draw = ImageDraw.Draw(framed)
    for i, name in enumerate(names):
        draw.text((4, i * row_height + row_height // 2 - 5), name, fill="black")
    return framed
