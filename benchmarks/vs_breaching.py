"""fl-sim's attacks side by side with the field's reference framework, breaching 0.1.2, on the same cases.

Each case is one image at 32 px (cifar10-sample, imagenet-sample and the bundled photos, resized), one
model (fl-sim builds it, seeded by the case; breaching's model gets the same weights copied in, and the
harness checks that both observe the same gradient), CIFAR-10 normalisation (breaching's constants),
batch 1, the same start (breaching's global seed is set so its torch.randn start equals fl-sim's) and the
same iteration budget. The cases run interleaved: fl-sim and breaching take turns going first. breaching
runs in its own isolated environment (`uv run --isolated --with breaching==0.1.2 --with hydra-core`,
benchmarks/breaching_worker.py); it is never a dependency of the product.

    fl-sim dlg  ↔ breaching deepleakage                      (DLG LeNet, joint labels, L-BFGS)
    fl-sim idlg ↔ breaching deepleakage, attack_type=optimization, label_strategy=iDLG
    fl-sim ggi  ↔ breaching invertinggradients               (ResNet-18, CIFAR stem; BatchNorm eval or train)
    ggi-r50-224: GGI on ResNet-50 (ImageNet stem), 224 px, batch 8 of the photos / imagenet-sample, ImageNet
                 normalisation (breaching's 5_small_batch_imagenet case on ImageNet's data config) — the GPU case;
                 batches are scored after one-to-one pairing

Prints JSON: one row per (attack, case, framework) — image, seed, iterations, seconds per iteration, PSNR, SSIM,
label right, success (PSNR ≥ 20 dB) — and per attack and framework the median PSNR, the share below 20 dB and
the median seconds per iteration. Both sides are scored by fl-sim's metrics on the same [0, 1] images.

Time to quality (``--to-db 40``): both sides check the PSNR of their current iterate every 10 iterations and stop
once it reaches the target (``--iterations`` is then the cap, and sets both sides' step-lr milestones); a row adds
the seconds and iterations to the target (null: not reached within the cap), the summary the median seconds with
an unreached case counting as never (infinite), and the median per-case ratio where both reached it.

Usage: uv run python benchmarks/vs_breaching.py [--attacks dlg idlg ggi ggi-train ggi-r50-224] [--cases 24]
       [--iterations 200] [--to-db DB] [--device cpu|cuda]
       [--worker-python PATH  (a Python that has breaching==0.1.2, instead of uv)]
       uv run python benchmarks/vs_breaching.py --summarize saved.json   (the summary of a saved output)
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks import build_attack  # noqa: E402
from attacks.gradient_inversion import GradientInversion  # noqa: E402
from attacks.recipe import recipe  # noqa: E402
from fl_sim.base.streams import ATTACK_START  # noqa: E402
from fl_sim.data.images import TensorImageSet  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import psnr, ssim  # noqa: E402
from fl_sim.leakage.scoring import pair as pair_images  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.observation import Normalization  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402

BREACHING = ["uv", "run", "--isolated", "--no-project", "--with", "breaching==0.1.2", "--with", "hydra-core",
             "python"]
# breaching's CIFAR10 data config (case/data/CIFAR10.yaml), used by both sides
CIFAR10 = Normalization((0.4914672374725342, 0.4822617471218109, 0.4467701315879822),
                        (0.24703224003314972, 0.24348513782024384, 0.26158785820007324))
SOURCES = ("cifar10-sample", "imagenet-sample", "photos")
EVERY = 10  # iterations between the time-to-quality checks (fl-sim's monitor default)


# breaching's ImageNet data config (case/data/ImageNet.yaml)
IMAGENET = Normalization((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@dataclass(frozen=True)
class Pairing:
    ours: str  # fl-sim preset
    theirs: str  # breaching_worker.ATTACKS key
    model: str  # fl-sim model name
    breaching_model: str
    batchnorm: str
    size: int = 32  # image side (px)
    batch: int = 1  # images per client
    stem: str = "cifar"  # fl-sim's ResNet stem
    case: str = "1_single_image_small"  # breaching's case config
    data: str | None = None  # breaching's case/data config, when not the case's own
    norm: Normalization = CIFAR10
    sources: tuple[str, ...] = SOURCES


PAIRINGS = {
    "dlg": Pairing("dlg", "deepleakage", "lenet", "lenet_zhu", "train"),
    "idlg": Pairing("idlg", "idlg", "lenet", "lenet_zhu", "train"),
    "ggi": Pairing("ggi", "invertinggradients", "resnet18", "resnet18", "eval"),
    "ggi-train": Pairing("ggi", "invertinggradients", "resnet18", "resnet18", "train"),
    # issue 21's GPU case: ResNet-50 (ImageNet stem), 224 px, batch 8, ImageNet normalisation
    "ggi-r50-224": Pairing("ggi", "invertinggradients", "resnet50", "resnet50", "eval", size=224, batch=8,
                           stem="imagenet", case="5_small_batch_imagenet", data="ImageNet", norm=IMAGENET,
                           sources=("photos", "imagenet-sample")),
}


@dataclass(frozen=True)
class Case:
    image: str  # "source[first index]"
    pixels: torch.Tensor  # (B, 3, S, S) uint8
    labels: list[int]  # (B,) mod 10

    @property
    def x(self) -> torch.Tensor:
        return self.pixels.float() / 255


def cases(n: int, pair: Pairing) -> list[Case]:
    """The pairing's sources in turn, each case the next ``pair.batch`` images of its source (wrapping around)."""
    pools = {s: load_dataset(DataConfig(dataset=s, image_size=pair.size)).train for s in pair.sources}
    out = []
    for k in range(n):
        source = pair.sources[k % len(pair.sources)]
        first = k // len(pair.sources) * pair.batch
        x, y = pools[source].batch([(first + i) % len(pools[source]) for i in range(pair.batch)])
        out.append(Case(f"{source}[{first}]", (x * 255).round().to(torch.uint8), [int(v) % 10 for v in y]))
    return out


def score(images: torch.Tensor, truth: torch.Tensor, with_ssim: bool = True) -> tuple[float, float]:
    """Mean PSNR and SSIM (NaN without ``with_ssim``) of the reconstructions paired one-to-one with the true images."""
    i, j = pair_images(images, truth)
    quality = float(np.mean(psnr(images[i], truth[j])))
    return quality, float(np.mean(ssim(images[i], truth[j]))) if with_ssim else float("nan")


def ours(pair: Pairing, case: Case, seed: int, iterations: int, to_db: float | None = None,
         device: str = "cpu") -> tuple[dict, dict]:
    """fl-sim's attack on the case (stopped at ``to_db`` dB when given), and the state dict it attacked."""
    shape = (3, pair.size, pair.size)
    model = build_model(ModelConfig(name=pair.model, stem=pair.stem), 10, shape, seed=seed)
    pool = TensorImageSet(case.pixels, np.array(case.labels))
    obs, _ = observe(model, pool, [np.arange(pair.batch)], fedsgd_plan(batch_size=pair.batch,
                                                                       batchnorm=pair.batchnorm), pair.norm, 10,
                     device)
    reached: dict[str, float] = {}
    truth = pool.images(list(range(pair.batch)))
    if to_db is None:
        attack = build_attack(pair.ours, {"iterations": iterations, "seed": seed})
    else:
        def monitor(iteration: int, images: torch.Tensor) -> bool:
            # PSNR only, as the breaching side's check: the monitor's time counts on fl-sim's clock
            if "seconds" not in reached and score(images, truth, with_ssim=False)[0] >= to_db:
                reached.update(seconds=time.perf_counter() - start, iterations=iteration)
            return "seconds" in reached

        attack = GradientInversion(pair.ours, recipe(pair.ours, iterations=iterations, seed=seed), monitor)
    start = time.perf_counter()
    rec = attack.reconstruct(obs, model.to(device))
    row = {"seconds_per_iteration": rec.seconds / max(rec.iterations, 1), "iterations": rec.iterations,
           "seconds_to_target": reached.get("seconds"), "iterations_to_target": reached.get("iterations"),
           "labels": None if rec.labels is None else [int(v) for v in rec.labels], "failure": rec.failure,
           "gradient_norm": float(torch.sqrt(sum(obs.update[n].pow(2).sum() for n, _ in model.named_parameters())))}
    if rec.images.shape[0]:
        row["psnr"], row["ssim"] = score(rec.images, truth)
    return row, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


class Breaching:
    """The isolated breaching worker, one case per request."""

    def __init__(self, python: str | None) -> None:
        worker = str(Path(__file__).with_name("breaching_worker.py"))
        command = [python, worker] if python else [*BREACHING, worker]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="vs-breaching-"))
        # wait until the worker's environment is installed and imported: that set-up must not run beside the
        # first case (it did: fl-sim's first case, which goes first, ran at up to 2.5x its later cases' time)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != json.dumps({"ready": True}):  # empty: the worker exited
            raise SystemExit("the breaching worker did not start (see its output above)")

    def __call__(self, pair: Pairing, state: dict, case: Case, seed: int, iterations: int,
                 to_db: float | None = None, device: str = "cpu") -> dict:
        path, out = self.tmp / "case.pt", self.tmp / "rec.pt"
        torch.save({"attack": pair.theirs, "model": pair.breaching_model, "state": state, "x": case.x,
                    "labels": case.labels, "case": pair.case, "data": pair.data, "device": device,
                    "mean": list(pair.norm.mean), "std": list(pair.norm.std), "batchnorm": pair.batchnorm,
                    "iterations": iterations, "out": str(out), "to_db": to_db, "every": EVERY,
                    # fl-sim's start for this case (restart 0, round 1, client 0): torch.randn from a CPU
                    # generator with this seed is the candidate (then DLG's label logits) both sides start from
                    "init_seed": ATTACK_START.seed(seed, 0, 1, 0)}, path)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path}\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        if "error" in answer:
            return {"failure": answer["error"]}
        row = {"seconds_per_iteration": answer["seconds"] / max(answer["iterations"], 1),
               "iterations": answer["iterations"], "labels": answer["labels"], "failure": None,
               "gradient_norm": answer["gradient_norm"], "seconds_to_target": answer.get("seconds_to_target"),
               "iterations_to_target": answer.get("iterations_to_target")}
        row["psnr"], row["ssim"] = score(torch.load(out), case.x)
        return row

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def summary(rows: list[dict]) -> dict:
    values = [r.get("psnr", 0.0) for r in rows]  # a failed case scores as nothing recovered
    return {"cases": len(rows), "median_psnr": round(float(np.median(values)), 2),
            "below_20db": sum(v < 20 for v in values),
            "median_ssim": round(float(np.median([r.get("ssim", 0.0) for r in rows])), 3),
            "labels_right": sum(bool(r["label_right"]) for r in rows),
            "median_seconds_per_iteration": round(float(np.median([r["seconds_per_iteration"] for r in rows
                                                                   if "seconds_per_iteration" in r] or [0])), 4)}


def summarize(out: dict) -> None:
    """Per attack and framework: the summary, and the median seconds per iteration over the cases both sides
    recovered (≥ 20 dB) — a stalled L-BFGS returns at once and would make a failing side look fast."""
    for attack in dict.fromkeys(r["attack"] for r in out["rows"]):
        rows = {side: {r["seed"]: r for r in out["rows"] if r["attack"] == attack and r["framework"] == side}
                for side in ("fl-sim", "breaching")}
        both = [k for k, r in rows["fl-sim"].items() if r["success"] and rows["breaching"].get(k, {}).get("success")]
        for side, mine in rows.items():
            entry = summary(list(mine.values()))
            entry["cases_both_recovered"] = len(both)
            entry["median_seconds_per_iteration_where_both_recovered"] = (
                round(float(np.median([mine[k]["seconds_per_iteration"] for k in both])), 4) if both else None)
            out["summary"].setdefault(attack, {})[side] = entry
        if out.get("to_db") is not None:
            time_to_quality(out["summary"][attack], rows)


def time_to_quality(entries: dict[str, dict], rows: dict[str, dict[int, dict]]) -> None:
    """Per side: cases that reached the target, the median seconds to it (a case that never reached it counts
    as infinitely slow; null when the median is such a case), and fl-sim ÷ breaching per case where both did."""
    for side, mine in rows.items():
        seconds = [r["seconds_to_target"] if r.get("seconds_to_target") is not None else np.inf
                   for r in mine.values()]
        median = float(np.median(seconds)) if seconds else np.inf
        entries[side].update(reached_target=int(np.isfinite(seconds).sum()),
                             median_seconds_to_target=round(median, 2) if np.isfinite(median) else None)
    both = [k for k, r in rows["fl-sim"].items() if r.get("seconds_to_target") is not None
            and rows["breaching"].get(k, {}).get("seconds_to_target") is not None]
    ratios = [rows["fl-sim"][k]["seconds_to_target"] / rows["breaching"][k]["seconds_to_target"] for k in both]
    entries["fl-sim"].update(cases_both_reached=len(both),
                             median_ratio_where_both_reached=round(float(np.median(ratios)), 3) if both else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", nargs="+", choices=list(PAIRINGS), default=["dlg", "idlg", "ggi", "ggi-train"])
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--iterations", type=int, default=200, help="the budget (with --to-db: the cap)")
    parser.add_argument("--to-db", type=float, help="time to quality: stop each side once its iterate reaches this "
                        "PSNR (checked every 10 iterations)")
    parser.add_argument("--worker-python", help="a Python with breaching==0.1.2 installed (default: uv --isolated)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both sides attack")
    parser.add_argument("--summarize", metavar="JSON", help="recompute the summary of a saved output and print it")
    args = parser.parse_args()
    if args.summarize:
        saved = json.loads(Path(args.summarize).read_text())
        saved["summary"] = {}
        summarize(saved)
        print(json.dumps(saved["summary"], indent=1))
        return
    if args.to_db is not None and any(PAIRINGS[a].batch > 1 for a in args.attacks):
        parser.error("--to-db watches batch-1 pairings only")
    torch.set_num_threads(torch.get_num_threads())
    if args.device == "cuda":  # the clients' updates in IEEE float32 on both sides (fl-sim's attacks already are)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    theirs = Breaching(args.worker_python)
    out: dict = {"benchmark": "vs_breaching", "iterations": args.iterations, "to_db": args.to_db,
                 "device": args.device, "threads": torch.get_num_threads(), "rows": [], "summary": {}}
    try:
        for attack in args.attacks:
            pair = PAIRINGS[attack]
            for k, case in enumerate(cases(args.cases, pair)):
                runs: dict[str, dict] = {}
                order = ("fl-sim", "breaching") if k % 2 == 0 else ("breaching", "fl-sim")
                state = None
                for side in order:
                    if side == "breaching" and state is None:  # the model's weights come from fl-sim's build
                        state = build_model(ModelConfig(name=pair.model, stem=pair.stem), 10,
                                            (3, pair.size, pair.size), seed=k).state_dict()
                    if side == "fl-sim":
                        runs[side], state = ours(pair, case, k, args.iterations, args.to_db, args.device)
                    else:
                        runs[side] = theirs(pair, state, case, k, args.iterations, args.to_db, args.device)
                a, b = runs["fl-sim"].get("gradient_norm"), runs["breaching"].get("gradient_norm")
                if a is not None and b is not None and abs(a - b) > 1e-4 * max(a, b):
                    raise SystemExit(f"{attack} case {k}: the two sides observed different gradients ({a} vs {b})")
                for side, row in runs.items():
                    row.update(attack=attack, framework=side, image=case.image, seed=k,
                               label_right=sorted(row.get("labels") or []) == sorted(case.labels),
                               success=row.get("psnr", 0.0) >= 20)
                    out["rows"].append(row)
                    shown = ("attack", "framework", "image", "psnr", "seconds_per_iteration", "seconds_to_target")
                    print(json.dumps({key: row.get(key) for key in shown}), file=sys.stderr)
    finally:
        theirs.close()
    summarize(out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
