"""Attack speed and quality on CPU (and GPU when present). Prints JSON.

* seconds per iteration and time-to-quality: DLG on the DLG LeNet (32 px) until 40 dB, GGI on
  ResNet-18 (CIFAR stem, 32 px, batch 1) until 18 dB;
* AFGI vs GGI on ResNet-18 at batch 1 and an equal iteration budget: PSNR / SSIM / AVD.

Usage: uv run python benchmarks/attack_speed.py [--images 3] [--budget 300] [--compile] [--device cpu]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.gradient_inversion import GradientInversion  # noqa: E402
from attacks.recipe import recipe  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import avd, psnr, ssim  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.observation import Normalization  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402


def time_to_quality(attack: str, model_name: str, index: int, target_db: float, max_iterations: int,
                    device: str, normalize: bool, **overrides) -> dict:
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    norm = data.normalization if normalize else Normalization.identity(3)
    model = build_model(ModelConfig(name=model_name), 10, (3, 32, 32), seed=index).to(device)
    obs, secret = observe(model, data.train, [np.array([index])], fedsgd_plan(), norm, 10, device)
    truth, _ = secret.examples(data.train)
    reached: dict[str, float] = {}
    start = time.perf_counter()

    def monitor(iteration: int, images: torch.Tensor) -> bool:
        if float(psnr(images, truth)[0]) >= target_db and "seconds" not in reached:
            reached.update(seconds=time.perf_counter() - start, iteration=iteration)
        return "seconds" in reached

    rec = GradientInversion(attack, recipe(attack, iterations=max_iterations, **overrides), monitor).reconstruct(
        obs, model)
    return {"image": index, "reached_target": "seconds" in reached, "time_to_target_s": reached.get("seconds"),
            "iterations_to_target": reached.get("iteration"), "final_psnr": float(psnr(rec.images, truth)[0]),
            "iterations": rec.iterations, "seconds_per_iteration": rec.seconds / max(1, rec.iterations)}


def equal_budget(images: int, budget: int, device: str) -> dict:
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    table = {}
    for attack in ("ggi", "afgi"):
        scores = {"psnr": [], "ssim": [], "avd": [], "seconds": []}
        for i in range(images):
            model = build_model(ModelConfig(name="resnet18"), 10, (3, 32, 32), seed=i).to(device)
            obs, secret = observe(model, data.train, [np.array([i])], fedsgd_plan(), data.normalization, 10, device)
            truth, _ = secret.examples(data.train)
            rec = GradientInversion(attack, recipe(attack, iterations=budget)).reconstruct(obs, model)
            for name, fn in (("psnr", psnr), ("ssim", ssim), ("avd", avd)):
                scores[name].append(float(fn(rec.images, truth)[0]))
            scores["seconds"].append(rec.seconds)
        table[attack] = {k: {"mean": float(np.mean(v)), "std": float(np.std(v))} for k, v in scores.items()}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--budget", type=int, default=300, help="iterations for the AFGI vs GGI comparison")
    parser.add_argument("--ggi-max", type=int, default=2000, help="iteration cap for GGI's time-to-18 dB")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="GGI with the torch.compile'd matching step "
                        "(time-to-quality then includes the one-time compilation)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["dlg", "ggi", "compare"])
    args = parser.parse_args()
    out: dict = {"benchmark": "attacks", "device": args.device, "torch_threads": torch.get_num_threads()}
    if "dlg" not in args.skip:
        out["dlg_lenet_to_40db"] = [time_to_quality("dlg", "lenet", i, 40.0, 300, args.device, False)
                                    for i in range(args.images)]
    if "ggi" not in args.skip:
        key = "ggi_resnet18_to_18db" + ("_compiled" if args.compile else "")
        out[key] = [time_to_quality("ggi", "resnet18", i, 18.0, args.ggi_max, args.device, True, compile=args.compile)
                    for i in range(args.images)]
    if "compare" not in args.skip:
        out[f"afgi_vs_ggi_resnet18_batch1_{args.budget}_iterations"] = equal_budget(args.images, args.budget,
                                                                                     args.device)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
