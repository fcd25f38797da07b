"""The attack's arithmetic (recipe ``precision``) side by side: GGI from the same start at an equal budget under
fp32 (TF32 off), tf32 (CUDA only) and bf16 autocast — seconds per iteration (after a warm-up run), the mean PSNR of
the one-to-one paired images, and how far each result lies from the fp32 one. Prints JSON.

Cases: benchmarks/batched_attacks.py's settings (one client): on a GPU GGI on ResNet-50 (224 px photos, batch 8), on
the CPU GGI on ResNet-18 (CIFAR stem, 32 px, batch 1; tf32 left out: it is a CUDA mode).

Usage: uv run python benchmarks/precision.py [--device cuda] [--settings ggi/resnet50-224] [--iterations 50]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from batched_attacks import SETTINGS, one_round, timed  # noqa: E402

from attacks.gradient_inversion import GradientInversion  # noqa: E402
from attacks.recipe import recipe  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import psnr  # noqa: E402
from fl_sim.leakage.scoring import pair  # noqa: E402
from fl_sim.scenario import DataConfig  # noqa: E402


def compare(name: str, iterations: int, device: str) -> list[dict]:
    setting = SETTINGS[name]
    model, (obs,) = one_round(setting, 1, device)
    data = load_dataset(DataConfig(dataset=setting.dataset, test_fraction=0.05))
    truth = data.train.images(list(range(setting.batch)))  # one_round's client 0: images 0 … b − 1
    rows, reference = [], None
    for precision in ("fp32", "tf32", "bf16") if device == "cuda" else ("fp32", "bf16"):
        attack = GradientInversion(setting.preset, recipe(setting.preset, iterations=iterations, precision=precision,
                                                          **setting.overrides))
        GradientInversion(setting.preset, attack.recipe.model_copy(update={"iterations": 2})).reconstruct(obs, model)
        rec, seconds = timed(lambda a=attack: a.reconstruct(obs, model))
        row = {"setting": name, "device": device, "precision": precision, "iterations": rec.iterations,
               "failure": rec.failure, "seconds_per_iteration": round(seconds / max(rec.iterations, 1), 4)}
        if rec.failure is None:
            i, j = pair(rec.images, truth)
            row["mean_psnr"] = round(float(np.mean(psnr(rec.images[i], truth[j]))), 2)
            row["final_loss"] = rec.loss_trace[-1]
            reference = rec.images if precision == "fp32" else reference
            if reference is not None:
                row["max_difference_to_fp32"] = float((rec.images - reference).abs().max())
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS))
    parser.add_argument("--iterations", type=int, default=50)
    args = parser.parse_args()
    names = args.settings or (["ggi/resnet50-224"] if args.device == "cuda" else ["ggi/resnet18"])
    out = {"benchmark": "precision", "rows": [r for n in names for r in compare(n, args.iterations, args.device)]}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
