"""Bad input: exit code 2, one line naming the key and the allowed values, no traceback, nothing written."""

import subprocess
import sys

import pytest

from fl_sim.scenario import load_scenario, scenario_from_dict
from tests.conftest import ROOT, tiny

BAD_SCENARIOS = [
    # (description, scenario dict, --set overrides, substrings the one-line error must contain)
    ("unknown top-level key", tiny() | {"federaton": {}}, [], ["unknown key 'federaton'", "did you mean 'federation'"]),
    ("unknown nested key", tiny(federation={"num_client": 3}), [],
     ["unknown key 'federation.num_client'", "did you mean 'federation.num_clients'", "rounds"]),
    ("wrong type", tiny(federation={"rounds": "three"}), [], ["federation.rounds", "valid integer", "'three'"]),
    ("out of range", tiny(federation={"rounds": 0}), [], ["federation.rounds", "greater than or equal to 1"]),
    ("negative lr", tiny(training={"lr": -1.0}), [], ["training.lr", "greater than 0"]),
    ("bad literal", tiny(training={"protocol": "fedsgdd"}), [], ["training.protocol", "'fedsgd' or 'fedavg'"]),
    ("clients per round", tiny(federation={"clients_per_round": 9}), [], ["clients_per_round", "1..3"]),
    ("fedsgd with steps", tiny(training={"local_steps": 3}), [], ["fedsgd", "local_steps"]),
    ("unknown dataset", tiny(data={"dataset": "mnist5"}), [], ["data.dataset", "unknown dataset 'mnist5'",
                                                               "did you mean 'mnist5k'", "cifar10-sample"]),
    ("unknown model", tiny(model={"name": "resnet19"}), [], ["model.name", "unknown model 'resnet19'", "resnet18"]),
    ("unknown attack", tiny() | {"attacks": [{"name": "dgl"}]}, [], ["attacks", "unknown attack 'dgl'"]),
    ("unknown defense", tiny() | {"defenses": [{"name": "dpp"}]}, [], ["defenses", "unknown defense 'dpp'"]),
    ("unknown metric", tiny() | {"metrics": ["psnrr"]}, [], ["metrics", "unknown metric 'psnrr'"]),
    ("missing weights file", tiny(model={"weights": "/nonexistent/w.pt"}), [], ["model.weights", "does not exist"]),
    ("threat-model round", tiny(threat_model={"rounds": [5]}), [], ["threat_model.rounds", "1..2"]),
    ("bad device", tiny() | {"device": "tpu"}, [], ["device", "'auto', 'cpu' or 'cuda'"]),
    ("bad --set value", tiny(), ["federation.rounds=-2"], ["federation.rounds", "greater than or equal to 1"]),
    ("bad --set key", tiny(), ["training.lrr=0.1"], ["unknown key 'training.lrr'", "did you mean 'training.lr'"]),
    ("--set without =", tiny(), ["federation.rounds"], ["--set expects section.key=value"]),
    ("missing folder path", tiny(data={"dataset": "folder", "path": "/nonexistent/images"}), [],
     ["dataset 'folder' is not available", "/nonexistent/images", "offline alternatives", "mnist5k"]),
    ("full dataset offline", tiny(data={"dataset": "cifar10", "root": "/nonexistent/root"}), [],
     ["dataset 'cifar10' is not available", "/nonexistent/root", "offline alternatives", "cifar10-sample"]),
    ("too many clients", tiny(federation={"num_clients": 200, "clients_per_round": 2}, data={"max_samples": 100}), [],
     ["federation.num_clients", "allowed: 1..50"]),
    ("cuda absent", tiny() | {"device": "cuda"}, [], ["device", "no CUDA device"]),
    ("oracle labels not granted", tiny() | {"attacks": [{"name": "ggi", "labels": "oracle"}]}, [],
     ["attacks.0", "needs capability 'oracle_labels'", "the default threat model",
      "granted: bn_buffers, global_model"]),
    ("bn buffers without BatchNorm", tiny() | {"attacks": [{"name": "ggi-bn"}]}, [],
     ["attacks.0", "BatchNorm buffers", "no BatchNorm layer"]),
    ("bn buffers of eval-mode clients", tiny(model={"name": "convnet"}, training={"batchnorm": "eval"})
     | {"attacks": [{"name": "ggi-bn"}]}, [], ["attacks.0", "eval-mode clients", "bn_target = 'global'"]),
    ("tf32 on the cpu", tiny() | {"device": "cpu", "attacks": [{"name": "ggi", "precision": "tf32"}]}, [],
     ["attacks.0", "precision = 'tf32' is TensorFloat-32 on CUDA", "runs on cpu", "'fp32' or 'bf16'"]),
    ("unknown precision", tiny() | {"attacks": [{"name": "ggi", "precision": "fp16"}]}, [],
     ["attacks.0.precision", "'fp32', 'tf32' or 'bf16'"]),
    ("separate epochs without epochs", tiny() | {"attacks": [{"name": "dimitrov"}]}, [],
     ["attacks.0", "epochs = 'separate'", "local_epochs > 1"]),
    ("protocol not granted", tiny(threat_model={"knows": ["update", "global_model"]}) | {"attacks": [{"name": "dlg"}]},
     [], ["attacks.0", "needs capability 'protocol'", "threat_model.knows does not grant",
          "granted: global_model, update"]),
    ("bn buffers not granted", tiny(model={"name": "convnet"}, threat_model={"knows": [
        "update", "global_model", "protocol"]}) | {"attacks": [{"name": "ggi-bn"}]}, [],
     ["attacks.0", "needs capability 'bn_buffers'"]),
    ("same attack twice", tiny() | {"attacks": [{"name": "ggi"}, {"name": "ggi", "tv": 0.1}]}, [],
     ["attacks.1", "'ggi' names attacks.0 too", "distinct label"]),
    ("label with a slash", tiny() | {"attacks": [{"name": "ggi", "label": "ggi/tv"}]}, [],
     ["attacks.0.label", "should match pattern"]),
    ("fashion-mnist missing", tiny(data={"dataset": "fashion-mnist", "root": "/nonexistent/root"}), [],
     ["dataset 'fashion-mnist' is not available", "dataset-fashion-mnist"]),
    ("unknown capability", tiny(threat_model={"knows": ["update", "oracle_label"]}), [],
     ["threat_model.knows", "unknown capability 'oracle_label'", "did you mean 'oracle_labels'", "surrogate_data"]),
]


@pytest.mark.parametrize("raw,overrides,needles", [c[1:] for c in BAD_SCENARIOS], ids=[c[0] for c in BAD_SCENARIOS])
def test_bad_input_exits_2_with_one_line(raw, overrides, needles, write_scenario, cli, tmp_path):
    if raw.get("device") == "cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is present")
    out = tmp_path / "run"
    args = ["run", write_scenario(raw), "--out", out] + [a for o in overrides for a in ("--set", o)]
    code, stdout, stderr = cli(*args)
    assert code == 2, (stdout, stderr)
    lines = [line for line in stderr.splitlines() if line.strip() and "rounds:" not in line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in stderr
    assert not out.exists(), "nothing may be written on bad input"


def test_malformed_toml(tmp_path, cli):
    path = tmp_path / "broken.toml"
    path.write_text("[federation\nrounds = 3\n")
    code, _, err = cli("run", path, "--out", tmp_path / "run")
    assert code == 2 and "is not valid TOML" in err and "line 1" in err
    assert not (tmp_path / "run").exists()


def test_missing_scenario_file(tmp_path, cli):
    code, _, err = cli("run", tmp_path / "nope.toml")
    assert code == 2 and "does not exist" in err and err.count("\n") == 1


def test_out_folder_not_clobbered(tmp_path, write_scenario, cli):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("run", write_scenario(tiny()), "--out", out)
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unknown_engine_is_a_usage_error(write_scenario, cli):
    code, _, err = cli("run", write_scenario(tiny()), "--engine", "ray")
    assert code == 2 and "scenario key 'engine': unknown engine 'ray'; choose one of: inprocess, simulation" in err


def test_console_script_prints_no_traceback(tmp_path, write_scenario):
    """The installed entry point itself (not only the in-process call) gives one line and code 2."""
    path = write_scenario(tiny(training={"protocol": "fedsgdd"}))
    proc = subprocess.run([sys.executable, "-m", "fl_sim.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: scenario key 'training.protocol': got 'fedsgdd'; allowed: 'fedsgd' or 'fedavg'"]


def test_set_overrides_any_key(write_scenario):
    s = load_scenario(write_scenario(tiny()), ["federation.rounds=5", "training.lr=0.5", "data.partition=dirichlet",
                                               "threat_model.clients=[0, 2]"])
    assert (s.federation.rounds, s.training.lr, s.data.partition) == (5, 0.5, "dirichlet")
    assert s.threat_model.clients == [0, 2]
    assert s.attacked(1, 2) and not s.attacked(1, 1)


def test_defaults_and_name_from_file(tmp_path):
    path = tmp_path / "my_experiment.toml"
    path.write_text("")
    s = load_scenario(path)
    assert s.name == "my_experiment" and s.training.protocol == "fedsgd" and s.device == "auto"


def test_resolved_scenario_round_trips():
    s = scenario_from_dict(tiny(data={"root": None}))
    assert scenario_from_dict(s.to_toml_dict()) == s


@pytest.mark.parametrize("path", sorted((ROOT / "scenarios").glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_scenarios_validate_and_fit_their_data(path):
    from fl_sim.data.sources import FASHION_DEBIAN_DIR
    from fl_sim.federation.setup import prepare

    if "fashion-mnist" in path.read_text() and not FASHION_DEBIAN_DIR.is_dir():
        pytest.skip("needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist; .ci/run does)")
    scenario = load_scenario(path)
    fed = prepare(scenario)
    assert len(fed.shards) == scenario.federation.num_clients and all(len(s) > 0 for s in fed.shards)


def test_device_auto_takes_cuda_when_it_is_visible_and_the_cpu_otherwise(monkeypatch):
    """The GPU path's device choice, checked on a machine without one (torch.cuda.is_available patched)."""
    import torch

    from fl_sim.base.errors import UserInputError
    from fl_sim.federation.setup import device_name, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cuda") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"GPU {i}")
    assert device_name(torch.device("cuda")) == "cuda:0 (GPU 0)" and device_name(torch.device("cuda:1")) == (
        "cuda:1 (GPU 1)")  # what run.json's server_device says
    assert device_name(torch.device("cpu")) == "cpu"
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserInputError, match="no CUDA device is visible"):
        resolve_device("cuda")
