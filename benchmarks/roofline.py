"""How far one gradient-matching iteration is from the machine's limits, phase by phase. Prints JSON.

The machine: fp32 matrix-product peak (the best of repeated 2048² ``torch.mm``) and memory bandwidth (a dot
product of two 45 MB vectors, read once each), on the threads the attack uses (``tuned_for``: small models on one;
a large model's single images with PyTorch's kernels on one and MKL's on all), where the limits are measured too.

The case: GGI's objective on one client's observation, built as the attack builds it (``ClientSimulator``,
``GradientDistance``: GemmConv2d, AffineBatchNorm2d, FusedCosine on CPU), in the phases of one iteration:
``forward`` (the client's loss), ``client gradient`` (∂L/∂θ with create_graph: what ``ClientSimulator`` returns),
``distance`` (cosine to the observed gradient) and ``∂/∂z`` (the double backward to the candidates).

Per phase: milliseconds (median), matrix-product FLOPs (mm / bmm / addmm / convolutions, counted by
``torch.utils.flop_counter``), the GFLOP/s that gives, the milliseconds those FLOPs take at the peak, and "times
the limit": the phase's time over the GEMM peak's — for the distance (two dot products) over the time to read the
trial gradient twice and the target once at the memory bandwidth. Then the attack's whole iteration
(``GradientInversion.reconstruct``'s seconds per iteration, from the difference of two runs: the phases plus the
TV prior, Adam, the box and the loop) against all phases' FLOPs at the peak; that ratio also bounds what solving
K problems together (attacks/batched.py) can gain over one by one, as K problems are K times the FLOPs (loosely:
the elementwise passes grow with K too).

Usage: uv run python benchmarks/roofline.py [--model resnet18] [--size 32] [--batch 1] [--batchnorm eval]
       [--repeats 15] [--iterations 30]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from attacks.gradient_inversion import GradientInversion  # noqa: E402
from attacks.matching import GradientDistance  # noqa: E402
from attacks.recipe import recipe  # noqa: E402
from attacks.simulate import ClientSimulator  # noqa: E402
from fl_sim.base.cpu import bundled_mkl, tuned_for  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402


def best_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def machine() -> dict:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x, y = torch.randn(11_250_000), torch.randn(11_250_000)
    mkl = bundled_mkl()
    return {"threads": torch.get_num_threads(), "blas_threads": mkl.MKL_Get_Max_Threads() if mkl is not None else None,
            "gemm_peak_gflops": round(2 * 2048**3 / best_seconds(lambda: a @ b, 5) / 1e9, 1),
            "memory_gb_per_s": round(2 * x.numel() * 4 / best_seconds(lambda: torch.dot(x, y), 10) / 1e9, 1)}


PHASES = ("forward", "client gradient", "distance", "∂/∂z")


def phases(sim: ClientSimulator, distance: GradientDistance, z0: torch.Tensor, labels: torch.Tensor,
           repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median milliseconds and matrix-product FLOPs of each phase of one objective evaluation + ∂/∂z."""
    theta = list(sim.theta.values())

    def once(times: dict[str, list[float]]) -> None:
        z = z0.clone().requires_grad_(True)
        marks = [time.perf_counter()]
        loss = sim._loss(sim.theta, z, labels)  # sim(z, y) = this forward and the next line's client gradient
        marks.append(time.perf_counter())
        grads = list(torch.autograd.grad(loss, theta, create_graph=True))
        marks.append(time.perf_counter())
        matched = distance(grads)
        marks.append(time.perf_counter())
        matched.backward(inputs=[z])
        marks.append(time.perf_counter())
        for name, t0, t1 in zip(PHASES, marks, marks[1:], strict=False):
            times[name].append(1e3 * (t1 - t0))

    flops: dict[str, float] = {}
    z = z0.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        loss = sim._loss(sim.theta, z, labels)
    flops["forward"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        grads = list(torch.autograd.grad(loss, theta, create_graph=True))
    flops["client gradient"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        matched = distance(grads)
    flops["distance"] = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        matched.backward(inputs=[z])
    flops["∂/∂z"] = counter.get_total_flops()
    times: dict[str, list[float]] = {name: [] for name in PHASES}
    for _ in range(3):
        once({name: [] for name in PHASES})
    for _ in range(repeats):
        once(times)
    return {name: float(np.median(v)) for name, v in times.items()}, flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batchnorm", choices=["eval", "train"], default="eval")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--iterations", type=int, default=30, help="of the whole attack, for its s/iteration")
    args = parser.parse_args()
    data = load_dataset(DataConfig(dataset="cifar10-sample" if args.size == 32 else "photos", image_size=args.size))
    shape = (3, args.size, args.size)
    model = build_model(ModelConfig(name=args.model), data.num_classes, shape, seed=0)
    batch = np.arange(args.batch)
    obs, _ = observe(model, data.train, [batch], fedsgd_plan(batch_size=args.batch, batchnorm=args.batchnorm),
                     data.normalization, data.num_classes, torch.device("cpu"))
    sim = ClientSimulator(model, obs, torch.device("cpu"))
    r = recipe("ggi", iterations=args.iterations, seed=0)
    distance = GradientDistance(sim.target, r.loss, r.layer_weights)
    z0 = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(0))
    labels = torch.as_tensor(data.train.batch(list(batch))[1])
    # the threads and kernels the attack runs this model with (GradientInversion.reconstruct: single images)
    with tuned_for(model, torch.device("cpu"), single_image=args.batch == 1):
        limits = machine()
        ms, flops = phases(sim, distance, z0, labels, args.repeats)
    peak = limits["gemm_peak_gflops"] * 1e9
    rows = []
    gradient_bytes = 4 * sum(t.numel() for t in sim.target)
    for name in PHASES:
        at_peak = 1e3 * flops[name] / peak
        row = {"phase": name, "ms": round(ms[name], 2), "gemm_gflop": round(flops[name] / 1e9, 3),
               "achieved_gflops": round(flops[name] / ms[name] / 1e6, 1), "ms_at_gemm_peak": round(at_peak, 2)}
        if name == "distance":  # memory-bound: two dot products read the trial gradient twice, the target once
            limit = 1e3 * 3 * gradient_bytes / (limits["memory_gb_per_s"] * 1e9)
            row |= {"limit": "memory", "ms_at_memory_bandwidth": round(limit, 2)}
        else:
            limit, row["limit"] = at_peak, "gemm"
        rows.append(row | {"times_the_limit": round(ms[name] / limit, 1)})
    short, long = (GradientInversion("ggi", r.model_copy(update={"iterations": n})).reconstruct(obs, model)
                   for n in (5, 5 + args.iterations))  # their difference: iterations without the set-up
    iteration_ms = 1e3 * (long.seconds - short.seconds) / (long.iterations - short.iterations)
    total_flops = sum(flops.values())
    floor_ms = 1e3 * total_flops / peak
    out = {"case": {"attack": "ggi", "model": args.model, "size": args.size, "batch": args.batch,
                    "batchnorm": args.batchnorm, "parameters": sum(p.numel() for p in model.parameters())},
           "machine": limits, "phases": rows,
           "objective_ms": round(sum(ms.values()), 1), "attack_iteration_ms": round(iteration_ms, 1),
           "gemm_floor_ms": round(floor_ms, 1), "gemm_times_the_limit": round(iteration_ms / floor_ms, 1)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
