"""Attacks end to end: published results on real data, inside the federation, offline, failures."""

import csv
import statistics

import numpy as np
import pytest
import torch

import attacks.batched
import attacks.matching
from attacks import build_attack
from fl_sim.data.sources import load_dataset
from fl_sim.federation.server import run_engine
from fl_sim.leakage.metrics import psnr
from fl_sim.leakage.single_client import fedsgd_plan, observe
from fl_sim.models import build_model
from fl_sim.observation import Normalization, Observation
from fl_sim.scenario import DataConfig, ModelConfig, scenario_from_dict
from fl_sim.store import RunStore
from tests.conftest import tiny


def rows_of(store: RunStore) -> list[dict]:
    with open(store.root / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def run(tmp_path, raw, name="run") -> RunStore:
    scenario = scenario_from_dict(raw)
    store = RunStore.create(scenario, tmp_path / name)
    run_engine(scenario, store, None)
    return store


def test_dlg_and_idlg_reach_30_db_median_on_real_cifar10_with_the_dlg_lenet():
    """Batch 1, the first three real CIFAR-10 images, unnormalised input as in the DLG papers (24 cases with
    both frameworks: benchmarks/vs_breaching.py)."""
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    norm = Normalization.identity(3)
    results = {"dlg": [], "idlg": []}
    for i in range(3):
        model = build_model(ModelConfig(name="lenet"), 10, (3, 32, 32), seed=i)
        obs, secret = observe(model, data.train, [np.array([i])], fedsgd_plan(), norm, 10)
        truth, label = secret.examples(data.train)
        for name in results:
            rec = build_attack(name, {"early_stop": 1e-7, "patience": 5}).reconstruct(obs, model)
            assert rec.failure is None
            results[name].append(float(psnr(rec.images, truth)[0]))
            if name == "idlg":
                assert rec.labels.tolist() == label.tolist()
    for name, values in results.items():
        assert statistics.median(values) >= 30, (name, values)


def test_attacks_run_inside_the_federation_and_rows_land_in_results(tmp_path):
    raw = tiny(federation={"rounds": 2}, threat_model={"record": "attacked", "rounds": [2], "clients": "all"},
               attacks=[{"name": "idlg", "iterations": 3}, {"name": "ggi", "iterations": 4}])
    raw["training"]["batch_size"] = 1
    store = run(tmp_path, raw)
    rows = rows_of(store)
    assert {r["round"] for r in rows} == {"2"} and {r["attack"] for r in rows} == {"idlg", "ggi"}
    assert {r["defense"] for r in rows} == {"none"}
    assert {r["metric"] for r in rows} >= {"psnr", "ssim", "mse", "avd", "lpips", "label_acc", "iterations", "seconds"}
    clients = {int(r["client"]) for r in rows}
    assert len(clients) == 2
    assert (store.root / "grids" / "round-0002.png").exists()
    assert len(list((store.root / "reconstructions" / "round-0002").glob("*.safetensors"))) == 4
    label_rows = [r for r in rows if r["metric"] == "label_acc"]
    assert all(float(r["value"]) == 1.0 for r in label_rows)  # iDLG labels at batch 1 on the LeNet


def test_a_diverging_attack_is_recorded_failed_and_the_run_goes_on(tmp_path, monkeypatch):
    def nan_distance(trial, *args):
        return sum(t.sum() for t in trial) * float("nan")

    monkeypatch.setattr(attacks.matching.GradientDistance, "__call__", lambda self, trial: nan_distance(trial))
    monkeypatch.setattr(attacks.batched, "gradient_distance", nan_distance)  # a round's clients, batched
    raw = tiny(attacks=[{"name": "ggi", "iterations": 5}])
    store = run(tmp_path, raw)
    failed = [r for r in rows_of(store) if r["metric"] == "failed"]
    assert failed and all(r["value"] == "1.0" and "nan" in r["note"] for r in failed)
    assert store.state()["last_round"] == 2


def test_an_attack_that_raises_is_recorded_failed_and_the_run_goes_on(tmp_path, monkeypatch):
    from attacks.gradient_inversion import GradientInversion

    def boom(self, obs, model, oracle_labels=None):
        raise MemoryError("out of memory in the attack")

    def boom_many(self, observations, model):
        raise MemoryError("out of memory in the batched attack")

    monkeypatch.setattr(GradientInversion, "reconstruct", boom)
    monkeypatch.setattr(GradientInversion, "reconstruct_many", boom_many)  # falls back to one by one
    store = run(tmp_path, tiny(attacks=[{"name": "ggi", "iterations": 2}]))
    failed = [r for r in rows_of(store) if r["metric"] == "failed"]
    assert failed and all("MemoryError: out of memory" in r["note"] for r in failed)
    assert store.state()["last_round"] == 2


def test_offline_attack_appends_rows_to_a_finished_run(tmp_path, cli):
    store = run(tmp_path, tiny(federation={"rounds": 1}))
    assert rows_of(store) == []
    code, out, err = cli("attack", store.root, "--attack", "idlg", "--set", "iterations=2")
    assert code == 0, err
    rows = rows_of(store)
    assert {r["attack"] for r in rows} == {"idlg"} and {r["round"] for r in rows} == {"1"}
    assert "appended idlg rows" in out
    code, _, err = cli("attack", store.root, "--attack", "ggj")
    assert code == 2 and "unknown attack 'ggj'" in err and "did you mean 'ggi'" in err
    code, _, err = cli("attack", store.root, "--attack", "ggi", "--set", "iterations=0")
    assert code == 2 and "iterations" in err and err.count("\n") == 1


def test_oracle_labels_come_from_the_simulation_and_are_flagged(tmp_path):
    knows = ["update", "global_model", "protocol", "oracle_labels"]
    store = run(tmp_path, tiny(federation={"rounds": 1}, threat_model={"knows": knows},
                               attacks=[{"name": "ggi", "labels": "oracle", "iterations": 2}]))
    rows = rows_of(store)
    assert rows and {r["label_strategy"] for r in rows} == {"oracle"}


def test_attacks_receive_only_the_observation_and_the_model(tmp_path, monkeypatch):
    from attacks.gradient_inversion import GradientInversion

    seen = []
    real = GradientInversion.reconstruct

    def spy(self, observation, model, oracle_labels=None):
        seen.append((type(observation), isinstance(model, torch.nn.Module), oracle_labels))
        return real(self, observation, model, oracle_labels)

    monkeypatch.setattr(GradientInversion, "reconstruct", spy)
    run(tmp_path, tiny(federation={"rounds": 1}, attacks=[{"name": "idlg", "iterations": 1}]))
    assert seen and all(s == (Observation, True, None) for s in seen)


@pytest.mark.parametrize("attack,needle", [
    ({"name": "ggi", "iterationz": 3}, "scenario key 'attacks.0.iterationz'"),
    ({"name": "ggi", "lr": -1.0}, "scenario key 'attacks.0.lr'"),
    ({"name": "afgi"}, "labels = 'lrb' needs the model's last residual block"),
])
def test_bad_attack_settings_exit_2_naming_the_key(attack, needle, write_scenario, cli, tmp_path):
    code, _, err = cli("run", write_scenario(tiny(attacks=[attack])), "--out", tmp_path / "out")
    assert code == 2 and needle in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cpu_and_gpu_agree():
    """Unsigned Adam: a signed step turns float-level differences into whole steps (attacks/batched.py).
    Never run yet (no GPU lent so far); the tolerance is the batched path's, not a measured GPU one."""
    data = load_dataset(DataConfig(dataset="cifar10-sample", test_fraction=0.05))
    model = build_model(ModelConfig(name="lenet"), 10, (3, 32, 32), seed=0)
    obs, _ = observe(model, data.train, [np.array([0])], fedsgd_plan(), Normalization.identity(3), 10)
    attack = build_attack("ggi", {"iterations": 20, "signed": False})
    cpu = attack.reconstruct(obs, model)
    gpu = attack.reconstruct(obs, model.cuda())
    torch.testing.assert_close(cpu.images, gpu.images, atol=1e-3, rtol=1e-3)


def test_every_attack_declares_what_it_targets():
    from attacks import ATTACKS, AttackType, Target

    targets = {name: kind.target for name, kind in ATTACKS.items()}
    assert {n for n, t in targets.items() if t == Target.GLOBAL_MODEL} == {"tldr", "tldr-inversion"}
    assert all(isinstance(build_attack(n, {}), ATTACKS.get(n).kind) for n in ATTACKS)
    with pytest.raises(TypeError, match="must extend ObservationAttack or ModelAttack"):
        AttackType(lambda params: object(), object)


def test_every_attack_gets_a_prior_only_baseline_on_an_unrelated_batch(tmp_path):
    from fl_sim.federation.setup import prepare
    from fl_sim.leakage.baseline import uninformative
    from fl_sim.store import load_observations

    raw = tiny(federation={"rounds": 1}, training={"batch_size": 1}, attacks=[{"name": "idlg", "iterations": 100}])
    store = run(tmp_path, raw)
    rows = rows_of(store)
    scored = {(r["client"], r["metric"]): float(r["value"]) for r in rows}
    clients = {r["client"] for r in rows}
    for client in clients:  # beside every score its baseline: the same attack on an unrelated batch's update
        assert {"baseline_psnr", "baseline_ssim", "baseline_label_acc", "baseline_failed"} <= {
            m for c, m in scored if c == client}
        assert scored[(client, "psnr")] > scored[(client, "baseline_psnr")] + 10  # iDLG, batch 1: the update leaks
    scenario = scenario_from_dict(raw)
    fed = prepare(scenario)
    obs = next(iter(load_observations(store.root, rounds={1})))
    other, labels = uninformative(obs, fed)
    again, _ = uninformative(obs, fed)
    assert other.meta == obs.meta and other.global_state is obs.global_state and len(labels) == obs.meta.batch_size
    assert other.update.keys() == obs.update.keys()
    assert all(other.update[k].shape == v.shape for k, v in obs.update.items())
    assert not torch.equal(other.update["fc.0.weight"], obs.update["fc.0.weight"])
    assert all(torch.equal(again.update[k], v) for k, v in other.update.items())  # seeded
    off = run(tmp_path, tiny(federation={"rounds": 1}, threat_model={"baseline": False},
                             attacks=[{"name": "idlg", "iterations": 2}]), name="off")
    assert not [r for r in rows_of(off) if r["metric"].startswith("baseline_")]
