"""Label recovery accuracy (multiset overlap) of idlg / yin / lrb on ResNet-18 with repeated labels, beside
the distinct-label bound (distinct true labels / K: the most a rule returning K distinct labels can score).

Batches of K real mnist5k images whose labels repeat (drawn from K/2 classes); FedSGD gradient of a
ResNet-18 (CIFAR stem). Prints JSON. Usage: uv run python benchmarks/label_recovery.py [--trials 50]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.labels import LABEL_STRATEGIES, LabelParams, LabelSignal  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import label_accuracy  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402

STRATEGIES = ("idlg", "yin", "lrb")


def repeated_label_batch(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """K indices whose labels come from K/2 classes, with at least one label repeated."""
    while True:
        classes = rng.choice(10, size=max(1, k // 2), replace=False)
        chosen = rng.choice(classes, size=k)
        if len(set(chosen.tolist())) < k:
            return np.array([rng.choice(np.flatnonzero(labels == c)) for c in chosen])


def pretrained_resnet18(data, steps: int, seed: int) -> torch.nn.Module:
    """The global model a few hundred SGD steps into training (the state a curious server attacks)."""
    model = build_model(ModelConfig(name="resnet18"), 10, data.shape, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(seed)
    model.train()
    for _ in range(steps):
        x, y = data.train.batch(rng.choice(len(data.train), 32, replace=False))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.normalization.normalize(x)), y).backward()
        opt.step()
    return model


def label_table(batch_sizes=(4, 8), trials: int = 50, seed: int = 0, train_steps: int = 100) -> dict:
    data = load_dataset(DataConfig(dataset="mnist5k"))
    rng = np.random.default_rng(seed)
    trained = pretrained_resnet18(data, train_steps, seed)
    table = {}
    for k in batch_sizes:
        scores: dict[str, list[float]] = {s: [] for s in (*STRATEGIES, "distinct_bound")}
        for _ in range(trials):
            model = copy.deepcopy(trained)
            batch = repeated_label_batch(data.train.labels, k, rng)
            obs, secret = observe(model, data.train, [batch], fedsgd_plan(batch_size=k), data.normalization, 10)
            true = torch.as_tensor(data.train.labels[batch])
            model.load_state_dict(obs.global_state)
            signal = LabelSignal(obs.update["fc.weight"], k, model)
            for s in STRATEGIES:
                scores[s].append(label_accuracy(LABEL_STRATEGIES.get(s)(signal, LabelParams()), true))
            scores["distinct_bound"].append(len(set(true.tolist())) / k)  # the best any distinct-label rule can do
        table[k] = {s: float(np.mean(v)) for s, v in scores.items()}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--train-steps", type=int, default=100, help="SGD steps (batch 32) before attacking")
    args = parser.parse_args()
    print(json.dumps({"benchmark": "label-recovery",
                      "model": f"resnet18 (CIFAR stem) after {args.train_steps} SGD steps on mnist5k",
                      "data": "mnist5k, labels repeated (K/2 classes)", "trials": args.trials,
                      "accuracy": label_table(trials=args.trials, train_steps=args.train_steps)}, indent=1))


if __name__ == "__main__":
    main()
