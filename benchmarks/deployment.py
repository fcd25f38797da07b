"""Seconds per round of Flower's Deployment Engine on loopback (fl-sim deploy: a SuperLink, one SuperNode per
client, a fresh ClientApp process per message), with and without the clients' evaluate message. Prints JSON.

The scenario is the deployment test's (mnist5k, LeNet, FedSGD, every client each round, DLG 5 iterations on
every update); the rounds' seconds come from the run's metrics.csv (``round_seconds``: train, observe, attack,
evaluate, persist), the median over the rounds after the first (the first also waits for the nodes).

Usage: uv run python benchmarks/deployment.py [--nodes 3] [--rounds 4] [--settings evaluate no-evaluate]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import tomli_w  # noqa: E402

from fl_sim.deploy.local import deploy_locally  # noqa: E402

SETTINGS = {"evaluate": True, "no-evaluate": False}  # federation.client_evaluation


def scenario(nodes: int, rounds: int) -> dict:
    return {"name": "bench-deploy", "seed": 0, "device": "cpu",
            "federation": {"num_clients": nodes, "clients_per_round": nodes, "rounds": rounds},
            "training": {"protocol": "fedsgd", "batch_size": 2, "lr": 0.1},
            "data": {"dataset": "mnist5k", "max_samples": 300}, "model": {"name": "lenet"},
            "threat_model": {"record": "attacked", "rounds": list(range(1, rounds + 1))},
            "attacks": [{"name": "dlg", "iterations": 5}], "metrics": ["mse", "psnr"]}


def run(setting: str, nodes: int, rounds: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scenario.toml"
        raw = scenario(nodes, rounds)
        raw["federation"]["client_evaluation"] = SETTINGS[setting]
        path.write_text(tomli_w.dumps(raw))
        start = time.perf_counter()
        folder, status = deploy_locally(path, [], None, Path(tmp) / "run", None, echo=lambda _line: None)
        total = time.perf_counter() - start
        seconds = pd.read_csv(folder / "metrics.csv").query("round > 0")["round_seconds"].tolist()
    return {"setting": setting, "status": status, "nodes": nodes, "rounds": rounds, "total_s": round(total, 1),
            "round_seconds": [round(s, 2) for s in seconds],
            "median_round_s_after_first": round(float(np.median(seconds[1:] or seconds)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    rows = [run(s, args.nodes, args.rounds) for s in args.settings]
    out = {"benchmark": "deployment", "cpus": os.cpu_count(), "rows": rows}
    if len(rows) == 2:
        out["ratio"] = round(rows[1]["median_round_s_after_first"] / rows[0]["median_round_s_after_first"], 2)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
