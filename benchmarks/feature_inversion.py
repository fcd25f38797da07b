"""Feature inversion runtime per image (the paper: ~11.5 s for 2000 iterations on its hardware) and quality.

The DLG LeNet at initialisation, real mnist5k images of one, features pruned at each ratio, the
paper's MNIST preset (2000 Adam iterations, no early stop). CPU, and the GPU when one is visible.
Prints JSON. Usage: uv run python benchmarks/feature_inversion.py [--images 3] [--ratios 0.0 0.7]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks import build_attack  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import psnr, ssim  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.observation.features import penultimate, prune  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402


def run(device: str, images: int, ratios: list[float]) -> dict:
    data = load_dataset(DataConfig(dataset="mnist5k"))
    model = build_model(ModelConfig(name="lenet"), data.num_classes, data.shape, seed=0)
    attack = build_attack("feature-inversion", {"epsilon": 0.0})
    rows = []
    for ratio in ratios:
        for index in range(images):
            batch = [np.array([index])]
            obs, _ = observe(model, data.train, batch, fedsgd_plan(), data.normalization, data.num_classes)
            x, _ = data.train.batch(batch[0])
            features = prune(penultimate(model.eval(), data.normalization.normalize(x)).detach(), ratio)
            target = copy.deepcopy(model).to(device)
            rec = attack.reconstruct(dataclasses.replace(obs, features=features), target)
            rows.append({"ratio": ratio, "image": index, "seconds": round(rec.seconds, 3),
                         "iterations": rec.iterations, "psnr": round(float(psnr(rec.images, x)[0]), 2),
                         "ssim": round(float(ssim(rec.images, x)[0]), 3)})
    per_image = [r["seconds"] for r in rows]
    return {"device": device, "seconds_per_image_mean": round(float(np.mean(per_image)), 3), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.0, 0.7])
    args = parser.parse_args()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(json.dumps([run(d, args.images, args.ratios) for d in devices], indent=1))


if __name__ == "__main__":
    main()
