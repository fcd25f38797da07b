"""Batched (and compiled) gradient matching against the one-by-one loop. Prints JSON.

Per setting: seconds per iteration of one problem (eager, one by one); then for each K = number of
problems (clients of one round): seconds for the one-by-one loop, for one batched optimisation and for
the batched step under ``torch.compile`` (compilation timed separately), throughput (reconstructions
per minute), the largest image difference to the one-by-one result and the final losses (equal
quality: same iterations, same result up to rounding), and peak memory (CUDA when used, else the
process's max RSS so far).

Settings: DLG with Adam on the DLG LeNet (32 px; the L-BFGS presets run one by one), GGI on the DLG
LeNet and on ResNet-18 (32 px, batch 1), and on a GPU GGI on ResNet-50 (224 px photos, batch 8). On CPU, eager,
ResNet-18's "batched" run takes one problem per core, each alone (fl_sim.base.cpu.one_per_core; attacks.batched.
unbatchable: vmap measured 0.71-0.77x there).

With ``--restarts R``: per setting also one client with R restarts, the restarts one after another against
``reconstruct`` as it runs them (on CPU, eager, models of a million parameters and more: one per core).

Usage: uv run python benchmarks/batched_attacks.py [--settings ggi/lenet ...] [--ks 1 4 8 16]
       [--iterations N] [--no-compile] [--restarts 8] [--device cpu]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.gradient_inversion import GradientInversion  # noqa: E402
from attacks.recipe import recipe  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Setting:
    preset: str
    model: str
    dataset: str
    batch: int
    iterations: int
    overrides: dict = dataclasses.field(default_factory=dict)
    gpu_only: bool = False


SETTINGS = {
    "dlg-adam/lenet": Setting("dlg", "lenet", "cifar10-sample", 1, 100, {"optimizer": "adam", "lr": 0.1}),
    "ggi/lenet": Setting("ggi", "lenet", "cifar10-sample", 1, 100),
    "ggi/resnet18": Setting("ggi", "resnet18", "cifar10-sample", 1, 20),
    "ggi/resnet50-224": Setting("ggi", "resnet50", "photos", 8, 20, gpu_only=True),
}


def one_round(setting: Setting, k: int, device: str):
    """K observations of one round: the same global model, client i's batch = images i·b … i·b + b − 1."""
    data = load_dataset(DataConfig(dataset=setting.dataset, test_fraction=0.05))
    shape = tuple(data.train.images([0]).shape[1:])
    model = build_model(ModelConfig(name=setting.model), data.num_classes, shape, seed=0).to(device)
    state = {n: v.clone() for n, v in model.state_dict().items()}
    round_obs = []
    for i in range(k):
        batch = np.arange(i * setting.batch, (i + 1) * setting.batch) % len(data.train)
        obs, _ = observe(model, data.train, [batch], fedsgd_plan(batch_size=setting.batch), data.normalization,
                         data.num_classes, device)
        model.load_state_dict(state)
        round_obs.append(dataclasses.replace(obs, client=i, global_state=state))
    return model, round_obs


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def measure(name: str, setting: Setting, k: int, iterations: int, device: str, compile_too: bool) -> dict:
    model, observations = one_round(setting, k, device)
    attack = GradientInversion(setting.preset, recipe(setting.preset, iterations=iterations, batched=True,
                                                      **setting.overrides))
    one_by_one, sequential = timed(lambda: [attack.reconstruct(o, model) for o in observations])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batched, together = timed(lambda: attack.reconstruct_many(observations, model))
    row = {"setting": name, "k": k, "iterations": iterations, "device": device,
           "sequential_s": round(sequential, 3), "batched_s": round(together, 3),
           "speedup": round(sequential / together, 2),
           "reconstructions_per_min_sequential": round(60 * k / sequential, 2),
           "reconstructions_per_min_batched": round(60 * k / together, 2),
           "max_image_difference": max(float((a.images - b.images).abs().max())
                                       for a, b in zip(one_by_one, batched, strict=True)),
           "final_loss_sequential": [round(r.loss_trace[-1], 5) for r in one_by_one],
           "final_loss_batched": [round(r.loss_trace[-1], 5) for r in batched],
           "peak_memory_mb": round(peak_memory_mb(device), 1)}
    if compile_too:
        compiled = GradientInversion(setting.preset, recipe(setting.preset, iterations=iterations, compile=True,
                                                            batched=True, **setting.overrides))
        warm = GradientInversion(setting.preset, compiled.recipe.model_copy(update={"iterations": 2}))
        _, compilation = timed(lambda: warm.reconstruct_many(observations, model))
        result, seconds = timed(lambda: compiled.reconstruct_many(observations, model))
        row |= {"compilation_s": round(compilation, 1), "compiled_s": round(seconds, 3),
                "speedup_compiled": round(sequential / seconds, 2),
                "reconstructions_per_min_compiled": round(60 * k / seconds, 2),
                "max_image_difference_compiled": max(float((a.images - b.images).abs().max())
                                                     for a, b in zip(one_by_one, result, strict=True))}
    return row


def restarts_row(name: str, setting: Setting, restarts: int, iterations: int, device: str) -> dict:
    """One client with ``restarts`` restarts (K = restarts problems): the restarts one after another (side by side
    switched off) against ``reconstruct`` as it runs them (on CPU, large models: one per core)."""
    model, (obs,) = one_round(setting, 1, device)
    attack = GradientInversion(setting.preset, recipe(setting.preset, iterations=iterations, restarts=restarts,
                                                      **setting.overrides))
    with mock.patch("attacks.gradient_inversion.faster_one_per_core", return_value=False):
        one_after_another, sequential = timed(lambda: attack.reconstruct(obs, model))
    rec, seconds = timed(lambda: attack.reconstruct(obs, model))
    return {"setting": name, "restarts": restarts, "iterations": iterations, "device": device,
            "sequential_s": round(sequential, 3), "side_by_side_s": round(seconds, 3),
            "speedup": round(sequential / seconds, 2),
            "max_image_difference": float((rec.images - one_after_another.images).abs().max()),
            "peak_memory_mb": round(peak_memory_mb(device), 1)}


def one_problem(name: str, setting: Setting, device: str) -> dict:
    """Seconds per iteration of one problem, eager, after a warm-up run."""
    model, (obs,) = one_round(setting, 1, device)
    attack = GradientInversion(setting.preset, recipe(setting.preset, iterations=setting.iterations,
                                                      **setting.overrides))
    attack.reconstruct(obs, model)
    rec, seconds = timed(lambda: attack.reconstruct(obs, model))
    return {"setting": name, "device": device, "threads": torch.get_num_threads(),
            "seconds_per_iteration": round(seconds / rec.iterations, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--iterations", type=int, help="iterations per run (default: per setting)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile runs")
    parser.add_argument("--restarts", type=int, nargs="+", default=[],
                        help="also: one client with R restarts, one after another against side by side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    settings = {n: SETTINGS[n] for n in args.settings if args.device == "cuda" or not SETTINGS[n].gpu_only}
    out = {"one_problem": [one_problem(n, s, args.device) for n, s in settings.items()], "batched": []}
    for n, s in settings.items():
        for k in args.ks:
            out["batched"].append(measure(n, s, k, args.iterations or s.iterations, args.device, not args.no_compile))
            print(json.dumps(out["batched"][-1]), flush=True)
        for restarts in args.restarts:
            out.setdefault("restarts", []).append(restarts_row(n, s, restarts, args.iterations or s.iterations,
                                                               args.device))
            print(json.dumps(out["restarts"][-1]), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
