"""The breaching side of benchmarks/vs_breaching.py. Runs in an isolated environment with breaching==0.1.2
(never the product's): it imports only torch and breaching, says it is ready in one JSON line, then reads one
case file path per stdin line and answers one JSON line per case.

A case file (torch.save) holds: attack (deepleakage | idlg | invertinggradients), model (lenet_zhu |
resnet18 | resnet50), case (breaching's case config) and data (its case/data config, or None: the case's own),
device (cpu | cuda), state (the fl-sim model's state_dict, copied in order into breaching's model), x (B, 3, H, W)
in [0, 1], labels (B,), mean, std, batchnorm (train | eval), iterations, init_seed (the global seed breaching
draws its start from: fl-sim's start seed, so both sides start from the same candidate — drawn on the CPU and
handed over as breaching's initial_data, so on CUDA too; DLG's label logits come from breaching's own generator,
the GPU's on CUDA), out (where the
reconstruction goes), to_db and every (time to quality: every ``every`` iterations the PSNR of breaching's current
iterate is checked, and the trial ends once it reaches ``to_db``; None: the full budget).
Breaching's dataset code is bypassed as its README's custom-data path does: construct_model, an honest server
with construct_server, UserSingleStep(dataloader=None), compute_local_updates(custom_data=...).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import breaching  # noqa: E402
import torch  # noqa: E402
from breaching.cases.users import UserSingleStep  # noqa: E402

ATTACKS = {  # breaching's attack config and the overrides the issue names
    "deepleakage": ("deepleakage", []),
    "idlg": ("deepleakage", ["attack.attack_type=optimization", "attack.label_strategy=iDLG"]),
    "invertinggradients": ("invertinggradients", []),
}


def config(case: dict):
    attack, extra = ATTACKS[case["attack"]]
    data = [f"case/data={case['data']}", "case.data.classes=10"] if case.get("data") else []  # fl-sim's 10 classes
    overrides = [f"case={case.get('case', '1_single_image_small')}", *data, f"case.model={case['model']}",
                 f"attack={attack}",
                 "case.server.pretrained=False", "case.server.model_state=trained",  # keep the copied weights
                 f"case.server.provide_public_buffers={case['batchnorm'] == 'eval'}",
                 "case.user.provide_labels=False", f"case.user.num_data_points={len(case['labels'])}",
                 f"attack.optim.max_iterations={case['iterations']}", "attack.optim.callback=100000", *extra]
    return breaching.get_config(overrides=overrides)


def copy_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """fl-sim's parameters and buffers into breaching's model, in module order (shapes checked)."""
    theirs = list(model.state_dict().items())
    ours = list(state.values())
    if len(theirs) != len(ours):
        raise SystemExit(f"state sizes differ: breaching {len(theirs)} tensors, fl-sim {len(ours)}")
    with torch.no_grad():
        for (name, t), o in zip(theirs, ours):
            if t.shape != o.shape:
                raise SystemExit(f"{name}: breaching {tuple(t.shape)} vs fl-sim {tuple(o.shape)}")
            t.copy_(o)


class TimeToQuality(list):
    """Stands in for breaching's per-trial loss list (``stats["Trial_0_Val"]``, appended to once per iteration,
    after the step and the box projection): every ``every`` appends it scores the current iterate and, at the
    target, ends the trial the way breaching's loop allows — KeyboardInterrupt, which it catches and then returns
    its best candidate."""

    def __init__(self, truth: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, to_db: float, every: int) -> None:
        super().__init__()
        self.truth, self.mean, self.std, self.to_db, self.every = truth, mean, std, to_db, every
        self.candidate: torch.Tensor | None = None  # breaching's iterate, set by the wrapped _compute_objective
        self.start = time.perf_counter()
        self.reached: tuple[float, int] | None = None

    def append(self, value: float) -> None:
        super().append(value)
        if len(self) % self.every or self.candidate is None or self.reached is not None:
            return
        with torch.no_grad():
            mse = float(((self.candidate * self.std + self.mean).clamp(0, 1) - self.truth).pow(2).mean())
        if mse == 0 or 10 * math.log10(1 / mse) >= self.to_db:  # PSNR, data range 1 (skimage's definition)
            self.reached = (time.perf_counter() - self.start, len(self))
            raise KeyboardInterrupt


def watch(attacker, truth: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, to_db: float,
          every: int) -> TimeToQuality:
    """Hooks a TimeToQuality into the attacker's trial 0 (its clock starts now)."""
    watched = TimeToQuality(truth, mean, std, to_db, every)
    run_trial, compute_objective = attacker._run_trial, attacker._compute_objective

    def trial(rec_model, shared_data, labels, stats, index, *args, **kwargs):
        if index == 0:
            stats[f"Trial_{index}_Val"] = watched
        return run_trial(rec_model, shared_data, labels, stats, index, *args, **kwargs)

    def objective(candidate, *args, **kwargs):
        watched.candidate = candidate
        return compute_objective(candidate, *args, **kwargs)

    attacker._run_trial, attacker._compute_objective = trial, objective
    return watched


def run(case: dict) -> dict:
    cfg = config(case)
    device = torch.device(case.get("device", "cpu"))
    if device.type == "cuda":  # IEEE float32, as fl-sim's side (cuDNN's convolutions default to TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    setup = dict(device=device, dtype=torch.float)
    model, loss_fn = breaching.cases.construct_model(cfg.case.model, cfg.case.data, pretrained=False)
    copy_state(model, case["state"])
    model.to(device)
    server = breaching.cases.construct_server(model, loss_fn, cfg.case, setup)
    model = server.vet_model(model)
    user = UserSingleStep(model, loss_fn, dataloader=None, setup=setup, idx=0, cfg_user=cfg.case.user)
    user.data_key = "inputs"
    mean = torch.tensor(case["mean"], device=device).view(1, -1, 1, 1)
    std = torch.tensor(case["std"], device=device).view(1, -1, 1, 1)
    x = case["x"].to(device)
    cfg.case.data.mean, cfg.case.data.std = list(case["mean"]), list(case["std"])
    attacker = breaching.attacks.prepare_attack(server.model, server.loss, cfg.attack, setup)
    payload = server.distribute_payload()
    shared, _ = user.compute_local_updates(payload, custom_data=dict(
        inputs=(x - mean) / std, labels=torch.tensor(case["labels"], device=device)))
    torch.manual_seed(case["init_seed"])  # breaching draws its start (randn; then DLG's label logits) from here
    start_point = torch.randn(x.shape, generator=torch.Generator().manual_seed(case["init_seed"]))  # that draw on CPU
    watched = (None if case.get("to_db") is None
               else watch(attacker, x, mean, std, case["to_db"], case["every"]))
    start = time.perf_counter()
    rec, stats = attacker.reconstruct([payload], [shared], server.secrets, initial_data=start_point.to(device),
                                      dryrun=False)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    iterations = len(stats.get("Trial_0_Val", [])) or case["iterations"]
    images = (rec["data"].detach() * std + mean).clamp(0, 1).cpu()
    torch.save(images, case["out"])
    labels = rec["labels"]
    labels = labels.argmax(-1) if labels.ndim > 1 else labels
    gradient = [g.detach() for g in shared["gradients"]]
    reached = None if watched is None else watched.reached
    return {"seconds": seconds, "iterations": iterations, "labels": [int(v) for v in labels],
            "gradient_norm": float(torch.sqrt(sum(g.pow(2).sum() for g in gradient))),
            "seconds_to_target": None if reached is None else reached[0],
            "iterations_to_target": None if reached is None else reached[1]}


def main() -> None:
    logging.disable(logging.INFO)
    answers, sys.stdout = sys.stdout, sys.stderr  # breaching prints; only answers go to the real stdout
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    answers.write(json.dumps({"ready": True}) + "\n")  # set up: the harness starts timing only after this line
    answers.flush()
    for line in sys.stdin:
        path = line.strip()
        if not path:
            continue
        try:
            answer = run(torch.load(path, weights_only=False))
        except Exception as err:  # one failed case is reported, the worker goes on
            answer = {"error": f"{type(err).__name__}: {err}"}
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    main()
