"""Train-mode BatchNorm: GGI with and without the client's BatchNorm buffers, against the eval-mode upper bound.

Per model (ConvNet, ResNet-18 with the CIFAR stem, 32 px) and batch size (1, 4, 8; distinct labels drawn from
cifar10-sample, so the label rule is exact and the comparison isolates BatchNorm), one FedSGD client update is
attacked three ways, from the same start and budget:

* ``ggi``: train-mode client, the replayed forward uses the candidates' own batch statistics (today's default);
* ``ggi + global-stats prior``: GradInversion's prior against the global model's running statistics;
* ``ggi-bn``: the statistics prior against the client's batch statistics recovered from the buffers it returned
  (capability bn_buffers); ``+ client-stats forward``: the replayed forward also normalises with them;
* ``ggi (eval-mode client)``: the same batch from a client that trains BatchNorm in eval mode (the upper bound
  most papers report).

Prints JSON rows (model, batch, variant, PSNR, SSIM, seconds) and the medians per model, batch and variant.

Usage: uv run python benchmarks/bn_buffers.py [--models convnet resnet18] [--batches 1 4 8]
       [--iterations 1000 300] [--seeds 2] [--variants ...]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks import build_attack  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import psnr, ssim  # noqa: E402
from fl_sim.leakage.scoring import pair  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402

VARIANTS = {  # name → (preset, overrides, the client's BatchNorm mode)
    "ggi": ("ggi", {}, "train"),
    "ggi + global-stats prior": ("ggi", {"bn_stats": 1e-2, "bn_target": "global"}, "train"),
    "ggi-bn": ("ggi-bn", {}, "train"),
    "ggi-bn + client-stats forward": ("ggi-bn", {"bn_forward": "client"}, "train"),
    "ggi (eval-mode client)": ("ggi", {}, "eval"),
}


def distinct_batch(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices with distinct labels."""
    classes = rng.choice(np.unique(labels), size, replace=False)
    return np.array([rng.choice(np.flatnonzero(labels == c)) for c in classes])


def run(model_name: str, batch: int, seed: int, iterations: int, data, variants: list[str]) -> list[dict]:
    rng = np.random.default_rng(seed)
    idx = distinct_batch(np.asarray(data.train.labels), batch, rng)
    model = build_model(ModelConfig(name=model_name), 10, data.shape, seed=seed)
    rows = []
    for variant in variants:
        attack, overrides, mode = VARIANTS[variant]
        obs, secret = observe(model, data.train, [idx], fedsgd_plan(batch_size=batch, batchnorm=mode),
                              data.normalization, 10)
        truth, _ = secret.examples(data.train)
        start = time.perf_counter()
        rec = build_attack(attack, overrides | {"iterations": iterations, "seed": seed}).reconstruct(obs, model)
        seconds = time.perf_counter() - start
        ri, gi = pair(rec.images, truth)
        rows.append({"model": model_name, "batch": batch, "seed": seed, "variant": variant,
                     "iterations": iterations, "psnr": round(float(psnr(rec.images[ri], truth[gi]).mean()), 2),
                     "ssim": round(float(ssim(rec.images[ri], truth[gi]).mean()), 3),
                     "seconds": round(seconds, 1), "failure": rec.failure})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["convnet", "resnet18"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8])
    ap.add_argument("--iterations", nargs="+", type=int, default=[1000, 300], help="per model, in order")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = load_dataset(DataConfig(dataset="cifar10-sample"))
    rows = [r for model, its in zip(args.models, args.iterations, strict=True) for b in args.batches
            for s in range(args.seeds) for r in run(model, b, s, its, data, args.variants)]
    summary = {}
    for r in rows:
        summary.setdefault(f"{r['model']} B={r['batch']} {r['variant']}", []).append(r)
    print(json.dumps({"summary": {k: {"median_psnr": float(np.median([r["psnr"] for r in v])),
                                      "median_ssim": float(np.median([r["ssim"] for r in v])),
                                      "median_seconds": float(np.median([r["seconds"] for r in v]))}
                                  for k, v in summary.items()}}, indent=1))


if __name__ == "__main__":
    main()
