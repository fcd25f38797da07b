"""Benchmark: wall time of a 10-client × 3-round mnist5k LeNet FedSGD run on the inprocess engine.

Splits the time into the federation itself and the server's recording overhead (writing
Observations and Secrets). Prints JSON. Usage: uv run python benchmarks/federation.py [--repeats 3]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from fl_sim.base.logs import configure_console  # noqa: E402
from fl_sim.federation.server import run_engine  # noqa: E402
from fl_sim.federation.setup import prepare  # noqa: E402
from fl_sim.scenario import Scenario, scenario_from_dict  # noqa: E402
from fl_sim.store import RunStore  # noqa: E402

SCENARIO = {
    "name": "bench-federation", "seed": 0, "device": "cpu",
    "federation": {"num_clients": 10, "clients_per_round": 10, "rounds": 3},
    "training": {"protocol": "fedsgd", "batch_size": 8, "lr": 0.1},
    "data": {"dataset": "mnist5k"}, "model": {"name": "lenet"},
    "threat_model": {"record": "all"},
}


def timed_run(scenario: Scenario) -> tuple[float, float]:
    """(seconds of the whole run on the inprocess engine, seconds of them spent recording), in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        store = RunStore.create(scenario, Path(tmp) / "run")
        start = time.perf_counter()
        run_engine(scenario, store, None)
        total = time.perf_counter() - start
        rows = (store.root / "metrics.csv").read_text().splitlines()[1:]
        return total, sum(float(r.split(",")[-1]) for r in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure_console(0)
    scenario = scenario_from_dict(SCENARIO)
    t0 = time.perf_counter()
    prepare(scenario)
    setup = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeats):
        total, recording = timed_run(scenario)
        runs.append({"total_s": total, "recording_s": recording, "federation_s": total - recording})
    best = min(runs, key=lambda r: r["total_s"])
    print(json.dumps({
        "benchmark": "federation", "scenario": SCENARIO, "engine": "inprocess",
        "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "data_and_model_setup_s": round(setup, 3),
        "best": {k: round(v, 3) for k, v in best.items()},
        "runs": [{k: round(v, 3) for k, v in r.items()} for r in runs],
        "target_federation_s": 20.0,
    }, indent=1))


if __name__ == "__main__":
    main()
