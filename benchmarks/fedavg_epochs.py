"""FedAvg over several local epochs: Dimitrov et al.'s attack (`dimitrov`) against today's unrolled GGI.

Per case (local epochs E, shard size N), a client trains E shuffled epochs over N real mnist5k images in batches
of 4 (lr 0.05, plain SGD, the DLG LeNet as in scenarios/fedavg_unrolled_attack.toml) and returns its weights.
Attacked from the same start and budget by:

* ``ggi (yin labels)``: the unrolled GGI as that scenario runs it — one set of N images replayed every epoch;
* ``dimitrov (yin labels)``: one copy per epoch tied by the order-invariant epoch prior, the same labels;
* ``dimitrov (bias-count labels, the preset)`` and ``ggi (bias-count labels)``: both with label counts.

Scores: PSNR / SSIM of the N images after one-to-one pairing, label accuracy. Prints JSON rows and medians.

Usage: uv run python benchmarks/fedavg_epochs.py [--epochs 2 4] [--examples 8 16] [--iterations 300] [--seeds 2]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from attacks import build_attack  # noqa: E402
from fl_sim.data.partition import round_batches  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import label_accuracy, psnr, ssim  # noqa: E402
from fl_sim.leakage.scoring import pair  # noqa: E402
from fl_sim.leakage.single_client import observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402
from fl_sim.training import LocalTraining  # noqa: E402

VARIANTS = {"ggi (yin labels)": ("ggi", {"labels": "yin"}),
            "dimitrov (yin labels)": ("dimitrov", {"labels": "yin"}),
            "dimitrov (bias-count labels, the preset)": ("dimitrov", {}),
            "ggi (bias-count labels)": ("ggi", {"labels": "bias-count"})}


def case(data, epochs: int, n: int, seed: int, iterations: int) -> list[dict]:
    shard = np.random.default_rng(seed).choice(len(data.train), n, replace=False)
    model = build_model(ModelConfig(name="lenet"), 10, data.shape, seed=seed)
    plan = LocalTraining("fedavg", 0.05, 4, 1, epochs, "sgd", 0.0, 0.0, "train")
    batches = round_batches(shard, seed=seed, client=0, server_round=1, batch_size=4, local_epochs=epochs)
    obs, secret = observe(model, data.train, batches, plan, data.normalization, 10)
    truth, labels = secret.examples(data.train)
    rows = []
    for variant, (preset, overrides) in VARIANTS.items():
        start = time.perf_counter()
        rec = build_attack(preset, overrides | {"iterations": iterations, "seed": seed}).reconstruct(obs, model)
        ri, gi = pair(rec.images, truth)
        rows.append({"epochs": epochs, "examples": n, "seed": seed, "variant": variant, "iterations": iterations,
                     "psnr": round(float(psnr(rec.images[ri], truth[gi]).mean()), 2),
                     "ssim": round(float(ssim(rec.images[ri], truth[gi]).mean()), 3),
                     "label_acc": round(label_accuracy(rec.labels, labels), 3),
                     "seconds": round(time.perf_counter() - start, 1), "failure": rec.failure})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--examples", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--seeds", type=int, default=2)
    args = ap.parse_args()
    data = load_dataset(DataConfig(dataset="mnist5k"))
    rows = [r for e in args.epochs for n in args.examples for s in range(args.seeds)
            for r in case(data, e, n, s, args.iterations)]
    summary: dict[str, list[dict]] = {}
    for r in rows:
        summary.setdefault(f"E={r['epochs']} N={r['examples']} {r['variant']}", []).append(r)
    print(json.dumps({"summary": {k: {m: float(np.median([r[m] for r in v])) for m in ("psnr", "ssim", "label_acc",
                                                                                      "seconds")}
                                  for k, v in summary.items()}}, indent=1))


if __name__ == "__main__":
    main()
