"""The curious server records exactly what clients send; Secrets reproduce it; runs survive interrupts."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fl_sim.cli import execute
from fl_sim.federation.server import run_engine
from fl_sim.federation.setup import prepare
from fl_sim.leakage.secret import SecretLedger
from fl_sim.observation import Observation
from fl_sim.scenario import scenario_from_dict
from fl_sim.store import RunStore, load_observations
from tests.conftest import ROOT, tiny
from tests.conftest import run_inprocess as run


def recompute_gradient(obs: Observation, x: torch.Tensor, y: torch.Tensor, scenario) -> dict[str, torch.Tensor]:
    model = prepare(scenario).model()
    model.load_state_dict(obs.global_state)
    loss = F.cross_entropy(model(obs.normalization.normalize(x)), y)
    names, params = zip(*model.named_parameters(), strict=True)
    return dict(zip(names, torch.autograd.grad(loss, params), strict=True))


def test_fedsgd_gradient_equals_gradient_of_the_secret_batch(tmp_path):
    raw = tiny()
    store, seen = run(tmp_path, raw)
    scenario, fed = scenario_from_dict(raw), prepare(scenario_from_dict(raw))
    assert len(seen) == 4  # 2 rounds × 2 clients
    for obs in seen:
        secret = SecretLedger(store.layout).get(obs.server_round, obs.client)
        assert set(np.concatenate(secret.batches)) <= set(fed.shards[obs.client])  # the client's own data
        x, y = secret.examples(fed.data.train)
        assert x.shape[0] == obs.meta.batch_size == 2 and 0 <= float(x.min()) and float(x.max()) <= 1
        expected = recompute_gradient(obs, x, y, scenario)
        for name, grad in expected.items():
            torch.testing.assert_close(obs.update[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("model,optimizer,momentum", [("lenet", "sgd", 0.0), ("convnet", "sgd", 0.9),
                                                      ("lenet-relu", "adam", 0.0)])
def test_fedavg_weights_equal_rerunning_local_steps_from_the_secret(tmp_path, model, optimizer, momentum):
    raw = tiny(training={"protocol": "fedavg", "local_steps": 3, "batch_size": 4, "lr": 0.01,
                         "optimizer": optimizer, "momentum": momentum}, model={"name": model},
               federation={"rounds": 1})
    store, seen = run(tmp_path, raw)
    scenario = scenario_from_dict(raw)
    fed = prepare(scenario)
    for obs in seen:
        assert obs.kind == "weights" and obs.meta.local_steps == 3
        secret = SecretLedger(store.layout).get(obs.server_round, obs.client)
        net = fed.model()
        net.load_state_dict(obs.global_state)
        net.train()
        opt = (torch.optim.Adam(net.parameters(), lr=0.01) if optimizer == "adam"
               else torch.optim.SGD(net.parameters(), lr=0.01, momentum=momentum))
        for batch in secret.batches:
            x, y = fed.data.train.batch(batch)
            opt.zero_grad()
            F.cross_entropy(net(obs.normalization.normalize(x)), y).backward()
            opt.step()
        for name, value in net.state_dict().items():
            torch.testing.assert_close(obs.update[name], value, rtol=1e-5, atol=1e-6)


def test_fedsgd_server_step_is_the_mean_gradient_step(tmp_path):
    raw = tiny(federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2})
    _, seen = run(tmp_path, raw)
    first = [o for o in seen if o.server_round == 1]
    second = next(o for o in seen if o.server_round == 2)
    for name in first[0].global_state:
        mean_grad = torch.stack([o.update[name] for o in first]).mean(0)
        torch.testing.assert_close(second.global_state[name], first[0].global_state[name] - 0.1 * mean_grad)


def test_saved_observations_load_back_identically(tmp_path):
    store, seen = run(tmp_path, tiny())
    loaded = list(load_observations(store.root))
    assert [(o.server_round, o.client) for o in loaded] == [(o.server_round, o.client) for o in seen]
    for a, b in zip(seen, loaded, strict=True):
        assert a.meta == b.meta and a.normalization == b.normalization and a.image_shape == b.image_shape
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)
        assert all(torch.equal(a.global_state[k], b.global_state[k]) for k in a.global_state)


def test_threat_model_selects_rounds_and_clients(tmp_path):
    raw = tiny(federation={"num_clients": 3, "clients_per_round": 3, "rounds": 3},
               threat_model={"record": "attacked", "rounds": [2, 3], "clients": [1]})
    store, seen = run(tmp_path, raw)
    assert [(o.server_round, o.client) for o in seen] == [(2, 1), (3, 1)]
    assert [(o.server_round, o.client) for o in load_observations(store.root)] == [(2, 1), (3, 1)]
    assert sorted(p.name for p in (store.root / "secrets").iterdir()) == ["round-0002.json", "round-0003.json"]


def test_client_sampling_is_deterministic_and_recorded(tmp_path):
    raw = tiny(federation={"num_clients": 5, "clients_per_round": 2, "rounds": 3})
    a, _ = run(tmp_path, raw, "a")
    b, _ = run(tmp_path, raw, "b")
    col = lambda s: [line.split(",")[6] for line in (s.root / "metrics.csv").read_text().splitlines()[1:]]  # noqa
    assert col(a) == col(b) and len(set(col(a))) > 1


def test_client_evaluation_off_sends_no_evaluate_message_and_changes_no_update(tmp_path, monkeypatch):
    from fl_sim.engines import InProcessGrid

    sent: list[str] = []
    push = InProcessGrid.push_messages
    monkeypatch.setattr(InProcessGrid, "push_messages", lambda self, messages: push(
        self, [sent.append(m.metadata.message_type) or m for m in messages]))
    raw = tiny(federation={"num_clients": 3, "clients_per_round": 2, "rounds": 2})
    on, seen_on = run(tmp_path, raw, "on")
    assert sent.count("evaluate") == 4 and sent.count("train") == 4
    sent.clear()
    off, seen_off = run(tmp_path, tiny(federation=raw["federation"] | {"client_evaluation": False}), "off")
    assert "evaluate" not in sent and sent.count("train") == 4
    assert pd.read_csv(on.root / "metrics.csv")["eval_acc"].notna().all()
    assert pd.read_csv(off.root / "metrics.csv")["eval_acc"].isna().all()
    for a, b in zip(seen_on, seen_off, strict=True):
        assert all(torch.equal(a.update[k], b.update[k]) for k in a.update)


# --- the Secret is structurally out of the attacks' reach (import contracts: tests/test_architecture.py) ---
def test_observation_carries_no_secret(tmp_path):
    fields = {f.name for f in dataclasses.fields(Observation)}
    assert fields == {"server_round", "client", "kind", "global_state", "update", "meta", "normalization",
                      "num_classes", "image_shape", "extras", "features"}  # features: what a client chose to send
    store, seen = run(tmp_path, tiny())
    params = {n for n, _ in prepare(scenario_from_dict(tiny())).model().named_parameters()}
    assert set(seen[0].update) == params  # LeNet has no buffers: only the gradient, no indices
    for path in (store.root / "observations").rglob("*"):
        assert "indices" not in path.name and (path.suffix != ".json" or "indices" not in path.read_text())


# --- incremental writing, interrupts, resume, failures ---------------------------------------------
def test_interrupted_run_keeps_finished_rounds_and_resumes_to_the_same_result(tmp_path, cli):
    raw = tiny(federation={"rounds": 3})
    scenario = scenario_from_dict(raw)
    reference, _ = run(tmp_path, raw, "reference")

    store = RunStore.create(scenario, tmp_path / "interrupted")

    def interrupt_after_round_1(s, st, progress):
        def stop(server_round):
            progress(server_round)
            if server_round == 1:
                raise KeyboardInterrupt

        run_engine(s, st, stop)

    with pytest.raises(SystemExit) as exit_info:
        execute(scenario, store, interrupt_after_round_1)
    assert exit_info.value.code == 130
    assert store.state()["status"] == "interrupted" and store.last_round == 1
    assert len((store.root / "metrics.csv").read_text().splitlines()) == 2
    (store.root / "observations" / "round-0002").mkdir()  # what a kill mid-round 2 could leave behind

    code, out, err = cli("run", "--resume", store.root)
    assert code == 0, err
    assert store.state()["status"] == "finished" and store.last_round == 3
    assert [int(r.split(",")[0]) for r in (store.root / "metrics.csv").read_text().splitlines()[1:]] == [1, 2, 3]
    final, expected = store.checkpoint(), reference.checkpoint()
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    assert [(o.server_round, o.client) for o in load_observations(store.root)] == \
           [(o.server_round, o.client) for o in load_observations(reference.root)]
    code, out, _ = cli("run", "--resume", store.root)
    assert code == 0 and "nothing to resume" in out


def test_a_failing_client_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    import fl_sim.federation.client

    real = fl_sim.federation.client.local_update

    def flaky(model, pool, batches, plan, norm, device):
        if int(batches[0][0]) in prepare(scenario_from_dict(tiny())).shards[1]:
            raise RuntimeError("disk full on client 1")
        return real(model, pool, batches, plan, norm, device)

    monkeypatch.setattr(fl_sim.federation.client, "local_update", flaky)
    raw = tiny(federation={"num_clients": 3, "clients_per_round": 3, "rounds": 2})
    store, seen = run(tmp_path, raw)
    rows = (store.root / "metrics.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[7]) for r in rows] == [1, 1]  # one failure per round
    assert store.last_round == 2 and {o.client for o in seen} == {0, 2}


def test_quickstart_runs_end_to_end(tmp_path):
    out = tmp_path / "quick"
    proc = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", str(ROOT / "scenarios" / "quickstart.toml"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "run folder:" in proc.stdout
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(metrics) == 50 and metrics["test_acc"].iloc[-10:].mean() > metrics["test_acc"].iloc[:10].mean() + 0.1
    assert (out / "results.csv").read_text().startswith("run,round,client,attack,defense,metric,value")
    attacked = [(r, c) for r in (1, 25, 50) for c in (1, 3)]
    assert [(o.server_round, o.client) for o in load_observations(out)] == attacked  # only the attacked ones
    assert '"status": "finished"' in (out / "run.json").read_text()
    import csv

    with open(out / "results.csv", newline="") as f:
        psnr_rows = [r for r in csv.DictReader(f) if r["metric"] == "psnr" and not r["image"]]  # batch rows
    assert [(int(r["round"]), int(r["client"]), r["attack"]) for r in psnr_rows] == [(*a, "idlg") for a in attacked]
    assert all(float(r["value"]) > 30 for r in psnr_rows)  # iDLG recovers the digits, untrained and trained
    assert all((out / "grids" / f"round-{r:04d}.png").exists() for r in (1, 25, 50))


def test_list_shows_components_and_availability(cli):
    code, out, _ = cli("list")
    assert code == 0
    assert "mnist5k" in out and "[offline, available]" in out and "resnet50" in out and "engines: inprocess" in out


@pytest.mark.slow
def test_simulation_engine_gives_the_same_observations_as_inprocess(tmp_path):
    raw = tiny(federation={"num_clients": 3, "clients_per_round": 2, "rounds": 2})
    reference, _ = run(tmp_path, raw, "inprocess")
    scenario = scenario_from_dict(raw | {"engine": "simulation"})
    store = RunStore.create(scenario, tmp_path / "simulation")
    run_engine(scenario, store, None)
    ours, theirs = list(load_observations(store.root)), list(load_observations(reference.root))
    assert [(o.server_round, o.client) for o in ours] == [(o.server_round, o.client) for o in theirs]
    for a, b in zip(ours, theirs, strict=True):  # Ray workers may use another thread count: float tolerance
        assert dataclasses.replace(a.meta, train_loss=0.0) == dataclasses.replace(b.meta, train_loss=0.0)
        assert a.meta.train_loss == pytest.approx(b.meta.train_loss, rel=1e-5)
        for k in a.update:
            torch.testing.assert_close(a.update[k], b.update[k], rtol=1e-5, atol=1e-6)


def test_simulation_settings_reach_rays_init_and_the_client_actors():
    from fl_sim.base.errors import ScenarioError
    from fl_sim.engines import ray_backend

    joined = ray_backend(scenario_from_dict(tiny(simulation={"ray_address": "auto", "client_cpus": 2.0,
                                                             "client_gpus": 0.5})).simulation)
    assert joined["init_args"]["address"] == "auto"  # ray.init refuses num_cpus / num_gpus when it joins
    assert not {"num_cpus", "num_gpus"} & set(joined["init_args"])
    assert joined["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.5}
    local = ray_backend(scenario_from_dict(tiny()).simulation)
    assert local["init_args"]["num_cpus"] == (os.cpu_count() or 1) and "address" not in local["init_args"]
    assert local["client_resources"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    with pytest.raises(ScenarioError, match="simulation.client_gpus"):
        scenario_from_dict(tiny(simulation={"client_gpus": -1.0}))


def test_a_simulation_with_too_few_nodes_fails_at_once_and_a_deployment_logs_while_it_waits(caplog):
    from flwr.superlink.grid import InMemoryGrid

    from fl_sim.federation.server import discover_clients

    class TwoSimulatedNodes(InMemoryGrid):
        def __init__(self) -> None:  # the nodes a local simulation created: never more
            pass

        def get_node_ids(self) -> list[int]:
            return [11, 12]

    with pytest.raises(RuntimeError, match="options.num-supernodes = 4 under \\[superlink.local\\]"):
        discover_clients(TwoSimulatedNodes(), 4, simulation_grace=0.2)

    class Arriving:  # SuperNodes of a deployment connect one by one; the server waits and says so
        calls = 0

        def get_node_ids(self) -> list[int]:
            self.calls += 1
            return list(range(min(self.calls // 2, 3)))  # the fourth never comes

    with caplog.at_level("INFO", logger="fl_sim"), pytest.raises(RuntimeError, match="only 3 of 4 clients"):
        discover_clients(Arriving(), 4, timeout=3.2, log_every=0.5)
    assert any("waiting for SuperNodes: " in r.message and " of 4 connected" in r.message for r in caplog.records)


@pytest.mark.slow
def test_simulation_engine_joins_a_running_ray_cluster(tmp_path):
    """Flower's multi-node recipe on loopback: ``ray start --head``, then fl-sim with simulation.ray_address."""
    import shutil

    ray = shutil.which("ray") or str(Path(sys.executable).with_name("ray"))
    port = 6400 + os.getpid() % 500
    env = os.environ | {"RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1"], check=True, capture_output=True, env=env, timeout=180)
    try:
        raw = tiny(engine="simulation", simulation={"ray_address": f"127.0.0.1:{port}", "client_cpus": 1.0},
                   federation={"num_clients": 2, "clients_per_round": 2, "rounds": 1})
        store = RunStore.create(scenario_from_dict(raw), tmp_path / "joined")
        run_engine(scenario_from_dict(raw), store, None)
        assert store.last_round == 1 and len(list(load_observations(store.root))) == 2
    finally:
        subprocess.run([ray, "stop", "--force"], capture_output=True, env=env, timeout=120)


@pytest.mark.slow
def test_flwr_run_of_this_app_runs_the_quickstart_as_a_new_user_would(tmp_path):
    """README's `flwr run .` on a fresh FLWR_HOME: Flower starts its local SuperLink, which runs the quickstart
    (shortened by overrides) in this environment with as many simulated SuperNodes as clients."""
    from fl_sim.deploy.local import processes_under, terminate

    home, out = tmp_path / "flwr-home", tmp_path / "flwr-run"
    port = 39200 + os.getpid() % 400  # beside any local SuperLink already running (Flower's default: 39091)
    env = os.environ | {"FLWR_HOME": str(home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port), "FLWR_LOCAL_CONTROL_API_PORT": str(port + 1),
                        "RAY_USAGE_STATS_ENABLED": "0"}
    flwr = str(Path(sys.executable).with_name("flwr"))
    overrides = "federation.rounds=2;threat_model.rounds=[1];federation.client_evaluation=false"
    command = [flwr, "run", ".", "--federation-config", "num-supernodes=10", "--run-config",
               f"scenario='scenarios/quickstart.toml' out='{out}' overrides='{overrides}'", "--stream"]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        metrics = pd.read_csv(out / "metrics.csv")
        assert list(metrics["round"]) == [1, 2]
        results = pd.read_csv(out / "results.csv")
        psnr = results.query("attack == 'idlg' and metric == 'psnr' and image.isna()")
        assert sorted(psnr["client"]) == [1, 3] and (psnr["value"] > 30).all(), psnr
        assert (out / "report.html").is_file()
    finally:
        terminate(processes_under(home))  # the local SuperLink flwr started keeps running otherwise


# --- the curious strategy as a wrapper -------------------------------------------------------------------
def test_curious_strategy_wraps_a_weighted_mean_and_checks_it_at_construction(caplog):
    from flwr.serverapp.strategy import FedAvg, FedAvgM, FedMedian

    from fl_sim.federation.protocol import ObservedModel
    from fl_sim.federation.strategy import CuriousStrategy, honest_fedavg
    from fl_sim.training import LocalTraining

    scenario = scenario_from_dict(tiny())
    fed = prepare(scenario)
    observed = ObservedModel.of(fed.model(), LocalTraining.from_scenario(scenario.training), fed.norm, 10,
                                fed.data.shape)
    kwargs = dict(model=observed, node_clients={11: 0, 12: 1, 13: 2}, clients_per_round=2, seed=0,
                  observe=lambda r, c: True, on_round=lambda record: None)
    for inner in (FedAvgM(), FedMedian()):  # server momentum / a median: not the mean FedSGD's step needs
        with pytest.raises(ValueError, match="weighted mean"):
            CuriousStrategy(inner, **kwargs)
    with pytest.raises(ValueError, match="fraction_train = 1.0"):
        CuriousStrategy(FedAvg(fraction_train=0.5), **kwargs)
    strategy = CuriousStrategy(honest_fedavg(2, evaluate=True), **kwargs)
    with caplog.at_level("INFO"):
        strategy.summary()
    assert "CuriousStrategy: 2 of 3 clients" in caplog.text
    fedavg = dataclasses.replace(observed, plan=dataclasses.replace(observed.plan, protocol="fedavg"))
    CuriousStrategy(FedMedian(), **kwargs | {"model": fedavg})  # FedAvg replies are weights: any aggregate


def test_a_run_folder_of_a_newer_layout_is_refused_with_a_clear_message(tmp_path, cli):
    import json

    store, _ = run(tmp_path, tiny(federation={"rounds": 1}))
    state = json.loads(store.layout.state.read_text())
    assert state["layout"] == 1 and state["classes"] == [str(c) for c in range(10)]
    assert state["server_device"] == "cpu"  # tiny() sets device = "cpu"
    store.update_state(layout=99)
    code, _, err = cli("report", store.root)
    assert code == 2 and "newer fl-sim (run folder layout 99)" in err and err.count("\n") == 1
