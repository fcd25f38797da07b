"""How the cost grows. Prints JSON; ``--plot PNG`` draws the curves (README's docs/growth.png).

* attack: GGI's seconds per iteration (one objective evaluation with its double backward, and the signed Adam
  step) against the batch size (1 … 64, ResNet-18, 32 px), the image size (32 … 224 px, ResNet-18, batch 1,
  CIFAR stem up to 64 px as fl-sim builds it) and the model (32 px, batch 1). A run of n + 1 iterations less a
  run of one, over n = ``--iterations`` (after a warm-up). The images are real (cifar10-sample / imagenet-sample),
  repeated to fill a batch (timing does not depend on content); labels by Yin et al.'s rule (iDLG's only holds
  at batch 1);
* federation: seconds of one FedSGD round on the in-process engine against the number of clients (10 …
  1000, all sampled, LeNet on mnist5k, batch 4, every update recorded), and the recording's share of it.

Usage: uv run python benchmarks/growth.py [--iterations 3] [--clients 10 30 100 300 1000] [--plot docs/growth.png]
       uv run python benchmarks/growth.py --replot saved.json --plot docs/growth.png
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from federation import timed_run  # noqa: E402  (benchmarks/federation.py: this script's folder is on sys.path)

from attacks.gradient_inversion import GradientInversion  # noqa: E402
from attacks.recipe import recipe  # noqa: E402
from fl_sim.base.logs import configure_console  # noqa: E402
from fl_sim.data.images import TensorImageSet  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig, scenario_from_dict  # noqa: E402

BATCHES = [1, 2, 4, 8, 16, 32, 64]
SIZES = [32, 64, 128, 224]
MODELS = ["lenet", "convnet", "resnet18", "resnet50"]


def pool(source: str, size: int, n: int) -> tuple[TensorImageSet, object]:
    data = load_dataset(DataConfig(dataset=source, image_size=size))
    x, y = data.train.batch(list(range(len(data.train))))
    reps = -(-n // len(y))
    pixels = (x * 255).round().to(torch.uint8).repeat(reps, 1, 1, 1)[:n]
    return TensorImageSet(pixels, np.tile(np.asarray(y) % 10, reps)[:n]), data.normalization


def seconds_per_iteration(model_name: str, source: str, size: int, batch: int, iterations: int) -> float:
    images, norm = pool(source, size, batch)
    model = build_model(ModelConfig(name=model_name), 10, images.shape, seed=0)
    obs, _ = observe(model, images, [np.arange(batch)], fedsgd_plan(batch_size=batch), norm, 10)
    def run(n: int) -> float:
        return GradientInversion("ggi", recipe("ggi", iterations=n, labels="yin")).reconstruct(obs, model).seconds

    run(1)  # warm-up: allocations, oneDNN primitives
    return (run(iterations + 1) - run(1)) / iterations  # less the set-up and the final evaluation


def federation_round(clients: int) -> dict:
    scenario = scenario_from_dict({
        "name": f"growth-{clients}", "seed": 0, "device": "cpu",
        "federation": {"num_clients": clients, "clients_per_round": clients, "rounds": 1},
        "training": {"protocol": "fedsgd", "batch_size": 4, "lr": 0.1},
        "data": {"dataset": "mnist5k", "holdout_fraction": 0.0}, "model": {"name": "lenet"},
        "threat_model": {"record": "all"}})
    total, recording = timed_run(scenario)
    return {"clients": clients, "round_s": round(total, 2), "recording_s": round(recording, 2)}


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, ScalarFormatter

    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    (batch, size), (model, federation) = axes
    panels = [(batch, "batch", "batch size", out["attack_batch"], "ResNet-18, 32 px"),
              (size, "size", "image size (px)", out["attack_image_size"],
               "ResNet-18, batch 1; ImageNet stem above 64 px")]
    for ax, key, label, rows, title in panels:
        ax.loglog([r[key] for r in rows], [r["seconds_per_iteration"] for r in rows], "o-")
        ax.set(xlabel=label, ylabel="GGI seconds per iteration", title=title)
        ax.set_xticks([r[key] for r in rows], [str(r[key]) for r in rows])
        ax.xaxis.set_minor_locator(plt.NullLocator())
    rows = out["attack_model"]
    model.bar([r["model"] for r in rows], [r["seconds_per_iteration"] for r in rows])
    model.set(yscale="log", ylabel="GGI seconds per iteration", title="models, 32 px, batch 1")
    rows = out["federation"]
    n = [r["clients"] for r in rows]
    federation.loglog(n, [r["round_s"] for r in rows], "o-", label="round")
    federation.loglog(n, [r["recording_s"] for r in rows], "s--", label="recording (of the round)")
    federation.set(xlabel="clients per round", ylabel="seconds", title="one FedSGD round, in-process engine, LeNet")
    federation.set_xticks(n, [str(c) for c in n])
    federation.xaxis.set_minor_locator(plt.NullLocator())
    federation.legend()
    for ax in axes.flat:
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(plt.NullLocator())
        ax.grid(alpha=0.3)
    fig.suptitle(f"How fl-sim's cost grows ({out['threads']} CPU threads)")
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=3, help="iterations timed per point")
    parser.add_argument("--batches", type=int, nargs="+", default=BATCHES)
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--plot", type=Path, help="write the curves to this PNG")
    parser.add_argument("--replot", type=Path, metavar="JSON", help="only draw --plot from a saved output")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        return
    configure_console(0)
    out: dict = {"benchmark": "growth", "threads": torch.get_num_threads(), "attack": "ggi (labels yin)"}
    out["attack_batch"] = [{"batch": b, "seconds_per_iteration": round(
        seconds_per_iteration("resnet18", "cifar10-sample", 32, b, args.iterations), 4)} for b in args.batches]
    out["attack_image_size"] = [{"size": s, "seconds_per_iteration": round(
        seconds_per_iteration("resnet18", "imagenet-sample", s, 1, args.iterations), 4)} for s in args.sizes]
    out["attack_model"] = [{"model": m, "seconds_per_iteration": round(
        seconds_per_iteration(m, "cifar10-sample", 32, 1, args.iterations), 4)} for m in args.models]
    federation_round(min(args.clients))  # warm-up: the first run builds what later runs reuse
    out["federation"] = [federation_round(n) for n in args.clients]
    print(json.dumps(out, indent=1))
    if args.plot:
        plot(out, args.plot)


if __name__ == "__main__":
    main()
