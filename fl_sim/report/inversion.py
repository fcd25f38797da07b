"""The report's network-inversion section (TLDR): per run, round and model attack, the train-vs-test
nearest-neighbour table per conditioned class and the per-class grid (fl_sim.inversion wrote both)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
from PIL import Image

from fl_sim.report.images import Picture
from fl_sim.report.runs import RunData
from fl_sim.store import RunLayout

COLUMNS = {  # metric → column, format
    "confidence": ("confidence", ".3f"),
    "predicted_as_conditioned": ("predicted as conditioned", ".0%"),
    "nn_train_ssim": ("NN SSIM train", ".3f"),
    "nn_test_ssim": ("NN SSIM test", ".3f"),
    "ssim_gap": ("SSIM gap (train − test)", "+.4f"),
    "nn_train_avd": ("NN AVD train", ".3f"),
    "nn_test_avd": ("NN AVD test", ".3f"),
    "avd_gap": ("AVD gap (test − train)", "+.4f"),
    "train_closer": ("nearer to train", ".0%"),
    "nn_label_match": ("NN train label = class", ".0%"),
    "lpips_train": ("LPIPS train", ".3f"),
    "lpips_test": ("LPIPS test", ".3f"),
}


@dataclass(frozen=True)
class InversionBlock:
    run: str
    round: int
    attack: str
    table: pd.DataFrame  # one row per class, then "all"
    failure: str
    picture: Picture | None


def inversion_blocks(run: RunData, prefix: str) -> list[InversionBlock]:
    """``prefix``: where the report writes its pictures (e.g. ``report-files/``)."""
    layout = RunLayout(run.root)
    path = layout.inversion_rows
    if not path.exists():
        return []
    frame = pd.read_csv(path, dtype={"class": str, "note": str}).fillna({"note": ""})
    frame = frame[frame["round"] <= run.last_round]
    blocks = []
    for (rnd, attack), group in frame.groupby(["round", "attack"], sort=True):
        failed = group[(group["metric"] == "failed") & (group["value"] > 0)]
        wide = group.pivot_table(index="class", columns="metric", values="value", aggfunc="first", sort=False)
        rows = []
        for cls, values in wide.iterrows():
            row = {"class": cls}
            for metric, (column, spec) in COLUMNS.items():
                if metric in values and pd.notna(values[metric]):
                    row[column] = format(values[metric], spec)
            rows.append(row)
        table = pd.DataFrame([r for r in rows if len(r) > 1])
        grid = layout.inversion_grid(int(rnd), attack)
        picture = (Picture.of(Image.open(grid), f"{prefix}inversion-round-{int(rnd):04d}-{attack}.png",
                              f"{attack}, round {rnd}: generated images per class above their nearest training images")
                   if grid.exists() else None)
        blocks.append(InversionBlock(run.name, int(rnd), attack, table,
                                     "; ".join(failed["note"]) if len(failed) else "", picture))
    return blocks
