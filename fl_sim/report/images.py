"""Report pictures: PNG-encoded images that embed in HTML (data URI) and are written beside Markdown."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from fl_sim.leakage.grids import grid_image, load_round, round_grid
from fl_sim.store import RunLayout


@dataclass(frozen=True)
class Picture:
    """A named PNG: ``file`` is its path relative to the report, ``data_uri`` its self-contained form."""

    file: str
    png: bytes
    alt: str

    @classmethod
    def of(cls, image: Image.Image, file: str, alt: str) -> Picture:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return cls(file, buffer.getvalue(), alt)

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def truth_and_reconstruction(run_root: Path, server_round: int, attack: str, client: int,
                             file: str) -> Picture | None:
    """Two rows, (B, C, H, W) each: the client's private batch and the attack's paired reconstruction."""
    found = load_round(RunLayout(Path(run_root)), server_round).get((attack, client))
    if found is None or "images" not in found:
        return None
    picture = grid_image([found["ground_truth"], found["images"]], names=["ground truth", attack])
    return Picture.of(picture, file, f"round {server_round}, client {client}: ground truth and {attack}")


@dataclass(frozen=True)
class RoundImages:
    """One round's pictures: ground truth per client and each attack's reconstruction per client."""

    round: int
    clients: list[int]
    truth: dict[int, Picture]
    reconstructions: dict[tuple[str, int], Picture]  # (attack, client); absent when the attack failed
    overview: Picture  # the whole round as one grid (for Markdown)


def round_images(run_root: Path, server_round: int, prefix: str) -> RoundImages | None:
    layout = RunLayout(Path(run_root))
    loaded = load_round(layout, server_round)
    if not loaded:
        return None
    clients = sorted({c for _, c in loaded})
    truth, recs = {}, {}
    for (attack, client), tensors in loaded.items():
        if client not in truth:
            truth[client] = _strip(tensors["ground_truth"], f"{prefix}round-{server_round:04d}-client-{client}.png",
                                   f"round {server_round}, client {client}: ground truth")
        if "images" in tensors:
            file = f"{prefix}round-{server_round:04d}-{attack}-{client}.png"
            recs[(attack, client)] = _strip(tensors["images"], file,
                                            f"round {server_round}, client {client}: {attack}")
    overview = Picture.of(round_grid(layout, server_round), f"{prefix}round-{server_round:04d}.png",
                          f"round {server_round}: ground truth and reconstructions")
    return RoundImages(server_round, clients, truth, recs, overview)


def _strip(images: torch.Tensor, file: str, alt: str) -> Picture:
    """(B, C, H, W) in [0, 1] → one row, upscaled to at least 48 px."""
    return Picture.of(grid_image([images], min_side=48), file, alt)


def file_slug(text: str) -> str:
    """``text`` as part of a file name: letters, digits, - and _ kept, anything else a -."""
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text)
