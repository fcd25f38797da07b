"""Batched gradient matching (attacks.batched) against the one-by-one loop. Prints JSON.

For each setting and K = number of problems (clients of one round): seconds for the one-by-one loop
and for one batched optimisation with the same iterations, throughput (reconstructions per minute),
the largest image difference between the two (equal quality), and peak memory (CUDA when used,
else the process's max RSS). GGI's recipe on the DLG LeNet (32 px, CIFAR) and DLG with Adam.

Usage: uv run python benchmarks/batched_attacks.py [--ks 1 4 8 16] [--iterations 100] [--device cpu]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.gradient_inversion import GradientInversion  # noqa: E402
from attacks.recipe import recipe  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402
from fl_sim.single_client import fedsgd_plan, observe  # noqa: E402

SETTINGS = {"ggi/lenet": ("ggi", "lenet", {}), "dlg-adam/lenet": ("dlg", "lenet", {"optimizer": "adam", "lr": 0.1})}


def one_round(model_name: str, k: int, device: str):
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    model = build_model(ModelConfig(name=model_name), 10, (3, 32, 32), seed=0).to(device)
    state = {n: v.clone() for n, v in model.state_dict().items()}
    round_obs = []
    for i in range(k):
        obs, _ = observe(model, data.train, [np.array([i])], fedsgd_plan(), data.normalization, 10, device)
        round_obs.append(dataclasses.replace(obs, client=i, global_state=state))
    return model, round_obs


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(setting: str, k: int, iterations: int, device: str) -> dict:
    preset, model_name, overrides = SETTINGS[setting]
    model, observations = one_round(model_name, k, device)
    attack = GradientInversion(preset, recipe(preset, iterations=iterations, **overrides))
    start = time.perf_counter()
    one_by_one = [attack.reconstruct(o, model) for o in observations]
    sequential = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    batched = attack.reconstruct_many(observations, model)
    together = time.perf_counter() - start
    diff = max(float((a.images - b.images).abs().max()) for a, b in zip(one_by_one, batched, strict=True))
    return {"setting": setting, "k": k, "iterations": iterations, "device": device,
            "sequential_s": round(sequential, 3), "batched_s": round(together, 3),
            "speedup": round(sequential / together, 2),
            "per_iteration_ms_sequential": round(1000 * sequential / (k * iterations), 3),
            "per_iteration_ms_batched": round(1000 * together / iterations, 3),
            "reconstructions_per_min_sequential": round(60 * k / sequential, 1),
            "reconstructions_per_min_batched": round(60 * k / together, 1),
            "max_image_difference": diff, "peak_memory_mb": round(peak_memory_mb(device), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    rows = [measure(s, k, args.iterations, args.device) for s in SETTINGS for k in args.ks]
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
