"""DLG and iDLG as published on the DLG LeNet: batch 1, un-normalised 32 px CIFAR-10, L-BFGS lr 1, 300 steps, no
early stop — per image PSNR / SSIM / label, and the summary README's table shows. Prints JSON.

Usage: uv run python benchmarks/dlg_idlg.py [--images 8] [--iterations 300]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402

from attacks import build_attack  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import psnr, ssim  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.observation import Normalization  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=8, help="the first N training images of cifar10-sample")
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    out: dict = {"benchmark": "dlg_idlg", "model": "lenet (seed = image index)", "input": "un-normalised",
                 "iterations": args.iterations}
    for name in ("dlg", "idlg"):
        rows = []
        for i in range(args.images):
            model = build_model(ModelConfig(name="lenet"), 10, (3, 32, 32), seed=i)
            obs, secret = observe(model, data.train, [np.array([i])], fedsgd_plan(), Normalization.identity(3), 10)
            truth, label = secret.examples(data.train)
            rec = build_attack(name, {"iterations": args.iterations}).reconstruct(obs, model)
            rows.append({"image": i, "psnr": float(psnr(rec.images, truth)[0]),
                         "ssim": float(ssim(rec.images, truth)[0]),
                         "label_right": bool(rec.labels is not None and int(rec.labels[0]) == int(label[0])),
                         "iterations": rec.iterations, "seconds": round(rec.seconds, 2), "failure": rec.failure})
        values = [r["psnr"] for r in rows]
        out[name] = {"images": rows, "median_psnr": float(np.median(values)),
                     "at_least_30db": sum(v >= 30 for v in values), "labels_right": sum(r["label_right"] for r in rows)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
