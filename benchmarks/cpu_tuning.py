"""What fl_sim.base.cpu.tuned_for buys on a LeNet-sized attack: milliseconds per gradient-matching objective
evaluation (client gradient, L2 distance, ∂/∂z) with PyTorch's CPU defaults vs one thread and native
convolutions. DLG LeNet, 32 px, batch 1. Best of ``--repeats``, the two settings interleaved. Prints JSON.

Usage: uv run python benchmarks/cpu_tuning.py [--evaluations 200] [--repeats 5]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.matching import GradientDistance  # noqa: E402
from attacks.simulate import ClientSimulator  # noqa: E402
from fl_sim.base.cpu import tuned_for  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.observation import Normalization  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--evaluations", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    model = build_model(ModelConfig(name="lenet"), 10, (3, 32, 32), seed=0)
    obs, _ = observe(model, data.train, [np.array([0])], fedsgd_plan(), Normalization.identity(3), 10)
    sim = ClientSimulator(model, obs, torch.device("cpu"))
    distance = GradientDistance(sim.target, "l2", "uniform")
    z = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    y = torch.tensor([3])

    def run() -> float:
        start = time.perf_counter()
        for _ in range(args.evaluations):
            (grad,) = torch.autograd.grad(distance(sim(z, y)), z)
        return 1000 * (time.perf_counter() - start) / args.evaluations

    best = {"defaults": float("inf"), "tuned": float("inf")}
    for _ in range(args.repeats):
        for setting in best:
            with tuned_for(model, torch.device("cpu")) if setting == "tuned" else contextlib.nullcontext():
                best[setting] = min(best[setting], run())
    print(json.dumps({"benchmark": "cpu_tuning", "threads": torch.get_num_threads(), "ms_per_evaluation":
                      {k: round(v, 2) for k, v in best.items()}, "speedup": round(best["defaults"] / best["tuned"], 2)},
                     indent=1))


if __name__ == "__main__":
    main()
