"""Label recovery with repeated labels: label-existence and label-count accuracy of every gradient strategy.

Per model (ResNet-18 with the CIFAR stem, the ConvNet), state (untrained; after one epoch of SGD on the pool)
and batch size B, ``trials`` FedSGD updates on batches of B real mnist5k images drawn uniformly (labels repeat:
10 classes), train-mode BatchNorm. Per strategy (idlg, yin, lrb where the model has a last residual block,
bias-count):

* count accuracy: multiset overlap |ŷ ∩ y| / B (fl-sim's label_acc);
* existence accuracy: the share of the 10 classes whose presence in the batch the strategy gets right;

and the distinct-label bound (distinct true labels / B), the most count accuracy a rule returning B distinct labels
(idlg, yin) can reach. Prints JSON.

Usage: uv run python benchmarks/label_recovery.py [--models resnet18 convnet] [--batches 8 16 32 64]
       [--trials 20] [--states untrained epoch]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from attacks.labels import LABEL_STRATEGIES, LabelParams, LabelRecoveryError, LabelSignal  # noqa: E402
from attacks.simulate import ClientSimulator  # noqa: E402
from fl_sim.data.sources import load_dataset  # noqa: E402
from fl_sim.leakage.metrics import label_accuracy  # noqa: E402
from fl_sim.leakage.single_client import fedsgd_plan, observe  # noqa: E402
from fl_sim.models import build_model  # noqa: E402
from fl_sim.scenario import DataConfig, ModelConfig  # noqa: E402

STRATEGIES = ("idlg", "yin", "lrb", "bias-count")


def trained(model_name: str, data, epochs: float, seed: int) -> torch.nn.Module:
    """The global model after ``epochs`` passes of SGD (lr 0.05, momentum 0.9, batch 32) over the pool."""
    model = build_model(ModelConfig(name=model_name), 10, data.shape, seed=seed)
    if epochs <= 0:
        return model
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rng = np.random.default_rng(seed)
    model.train()
    order = np.concatenate([rng.permutation(len(data.train)) for _ in range(int(np.ceil(epochs)))])
    for start in range(0, int(epochs * len(data.train)) - 31, 32):
        x, y = data.train.batch(order[start : start + 32])
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.normalization.normalize(x)), y).backward()
        opt.step()
    return model


def existence(predicted: torch.Tensor, true: torch.Tensor, num_classes: int = 10) -> float:
    """Share of the classes whose presence / absence in the batch is predicted right."""
    p, t = set(predicted.tolist()), set(true.tolist())
    return sum((c in p) == (c in t) for c in range(num_classes)) / num_classes


def label_table(model_name: str = "resnet18", batch_sizes=(8, 16, 32, 64), trials: int = 20, epochs: float = 0,
                seed: int = 0, data=None) -> dict:
    """batch size → {strategy: {"count": mean accuracy, "existence": ...}, "distinct_bound": ...}."""
    data = data or load_dataset(DataConfig(dataset="mnist5k"))
    rng = np.random.default_rng(seed)
    model = trained(model_name, data, epochs, seed)
    table = {}
    for b in batch_sizes:
        scores: dict[str, dict[str, list[float]]] = {s: {"count": [], "existence": []} for s in STRATEGIES}
        bound = []
        for _ in range(trials):
            batch = rng.choice(len(data.train), b, replace=False)
            obs, _ = observe(model, data.train, [batch], fedsgd_plan(batch_size=b), data.normalization, 10)
            sim = ClientSimulator(model, obs, torch.device("cpu"))
            signal = LabelSignal(sim.label_signal_grad("fc"), b, sim.model, sim.label_signal_bias("fc"), 1, b,
                                 obs.image_shape)
            true = torch.as_tensor(data.train.labels[batch])
            for s in STRATEGIES:
                try:
                    found = LABEL_STRATEGIES.get(s)(signal, LabelParams())
                except LabelRecoveryError:  # lrb on a model without a last residual block
                    continue
                scores[s]["count"].append(label_accuracy(found, true))
                scores[s]["existence"].append(existence(found, true))
            bound.append(len(set(true.tolist())) / b)
        table[b] = {s: {k: round(float(np.mean(v)), 3) for k, v in kinds.items()} for s, kinds in scores.items()
                    if kinds["count"]} | {"distinct_bound": round(float(np.mean(bound)), 3)}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet18", "convnet"])
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--states", nargs="+", default=["untrained", "epoch"], choices=["untrained", "epoch"])
    args = parser.parse_args()
    torch.manual_seed(0)
    data = load_dataset(DataConfig(dataset="mnist5k"))
    for model in args.models:
        for state in args.states:
            table = label_table(model, args.batches, args.trials, 1.0 if state == "epoch" else 0, data=data)
            print(json.dumps({"benchmark": "label-recovery", "model": model, "state": state, "data": "mnist5k",
                              "trials": args.trials, "accuracy": table}), flush=True)


if __name__ == "__main__":
    main()
