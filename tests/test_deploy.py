"""Flower's Deployment Engine: loopback deployments equal the inprocess engine, survive a dead SuperNode,
leave no process behind; the compose files run what fl-sim deploy runs."""

from __future__ import annotations

import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fl_sim.deploy.local import FLOWER_APP, deploy_locally, processes_under
from fl_sim.store import load_observations
from tests.conftest import ROOT, run_inprocess, tiny

DEPLOY_TMP = Path(tempfile.gettempdir()) / "fl-sim-deploy-"  # prefix of every deployment's FLWR_HOMEs


def small(rounds: int = 2) -> dict:
    return tiny(name="deployed", federation={"num_clients": 3, "clients_per_round": 3, "rounds": rounds},
                threat_model={"record": "attacked", "rounds": list(range(1, rounds + 1))},
                attacks=[{"name": "dlg", "iterations": 5}], metrics=["mse", "psnr"])


def quiet(_line: str) -> None:
    pass


def observations(root: Path) -> dict[tuple[int, int], object]:
    return {(o.server_round, o.client): o for o in load_observations(root)}


@pytest.mark.slow
def test_a_loopback_deployment_observes_and_scores_what_the_inprocess_engine_does(tmp_path, write_scenario):
    raw = small()
    folder, status = deploy_locally(write_scenario(raw), [], None, tmp_path / "deployed", None, echo=quiet)
    assert status == "finished"
    assert not processes_under(DEPLOY_TMP)  # SuperLink, SuperNodes, SuperExecs and apps are all gone
    assert {p.name for p in (folder / "deploy-logs").iterdir()} == {
        "superlink.log", "supernode-0.log", "supernode-1.log", "supernode-2.log"}
    store, _ = run_inprocess(tmp_path, raw, "inprocess")
    deployed, local = observations(folder), observations(store.root)
    assert deployed.keys() == local.keys() and len(local) == 6
    for key, obs in local.items():
        other = deployed[key]
        assert obs.update.keys() == other.update.keys()
        for name in obs.update:  # bit-identical: replies are aggregated in client order, whatever the transport
            assert torch.equal(other.update[name], obs.update[name])
            assert torch.equal(other.global_state[name], obs.global_state[name])
    columns = ["round", "client", "attack", "metric", "image"]
    a, b = (pd.read_csv(root / "results.csv").query("metric != 'seconds'").sort_values(columns).reset_index(drop=True)
            for root in (folder, store.root))
    pd.testing.assert_frame_equal(a[columns], b[columns])
    assert set(a["metric"]) >= {"mse", "psnr", "failed"} and (a.query("metric == 'failed'")["value"] == 0).all()
    np.testing.assert_allclose(a["value"], b["value"], rtol=1e-4, atol=1e-4)  # NaN (e.g. no LPIPS) = NaN
    assert (folder / "report.html").is_file()


@pytest.mark.slow
def test_a_supernode_killed_mid_run_is_a_recorded_failure_and_the_run_finishes(tmp_path, write_scenario):
    def kill_after_round_one(deployment, out: Path) -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if (out / "metrics.csv").is_file() and len(pd.read_csv(out / "metrics.csv")) >= 1:
                deployment.kill_node(2)
                return
            time.sleep(0.5)

    folder, status = deploy_locally(write_scenario(small(rounds=3)), [], None, tmp_path / "deployed", None,
                                    echo=quiet, during=kill_after_round_one)
    assert status == "finished"
    assert not processes_under(DEPLOY_TMP)
    metrics = pd.read_csv(folder / "metrics.csv")
    assert list(metrics["round"]) == [1, 2, 3]
    assert metrics.loc[0, "failures"] == 0 and (metrics.loc[1:, "failures"] >= 1).all()
    assert "client 2:" in (folder / "run.log").read_text()
    seen = observations(folder)
    assert {c for (r, c) in seen if r == 3} == {0, 1}  # the others go on and are still attacked
    assert metrics["test_acc"].notna().all()


def test_the_submitted_app_is_the_projects_flower_app():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert project["components"] == FLOWER_APP["components"]
    assert project["config"] == FLOWER_APP["config"]
    assert project["publisher"] == FLOWER_APP["publisher"]


def test_deploy_rejects_bad_input_before_starting_anything(tmp_path, write_scenario, cli):
    before = {p.pid for p in processes_under(DEPLOY_TMP)}  # (another deployment may be running)
    path = write_scenario(small())
    code, _, err = cli("deploy", path, "--nodes", "2", "--out", tmp_path / "a")
    assert code == 2 and "clients_per_round" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a").exists()
    code, _, err = cli("deploy", path, "--nodes", "0")
    assert code == 2 and "--nodes" in err
    code, _, err = cli("deploy", path, "--certificates", tmp_path)
    assert code == 2 and "ca.crt" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    code, _, err = cli("deploy", path, "--out", tmp_path / "busy")
    assert code == 2 and "not empty" in err
    code, _, err = cli("run", path, "--engine", "deployment")
    assert code == 2 and "--superlink HOST:PORT" in err
    code, _, err = cli("run", path, "--superlink", "localhost")
    assert code == 2 and "is not HOST:PORT" in err
    assert {p.pid for p in processes_under(DEPLOY_TMP)} <= before


def flower_parsers() -> dict[str, object]:
    """The installed Flower's own argument parsers (the ones its CLI reference documents)."""
    from flwr.supercore.cli.flower_superexec import _parse_args as superexec
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    return {"superlink": _parse_args_run_superlink(), "supernode": _parse_args_run_supernode(),
            "superexec": superexec()}


def test_compose_files_run_the_deploy_topology_with_flags_flower_accepts():
    from importlib.metadata import version

    import yaml

    from fl_sim.deploy.compose import FILES, render
    from fl_sim.deploy.local import superlink_command, supernode_command

    committed = {name: yaml.safe_load((ROOT / name).read_text()) for name in FILES.values()}
    services = committed["docker-compose.yml"]["services"]
    nodes = sum(name.startswith("supernode-") for name in services)
    assert nodes >= 2
    assert {name: yaml.safe_load(text) for name, text in render(nodes).items()} == committed  # up to date
    parsers, flwr = flower_parsers(), version("flwr")

    def parse(kind: str, command: list[str]):
        return parsers[kind].parse_args(command)  # SystemExit(2) on a flag this Flower rejects

    link = services["superlink"]
    args = parse("superlink", link["command"])
    assert link["image"] == f"flwr/superlink:{flwr}" and args.host == "0.0.0.0" and args.isolation == "process"
    assert link["ports"] == [f"{args.port}:{args.port}"] and args.runtime_dependency_install is False
    local = parse("superlink", superlink_command(port=1234)[1:])  # what fl-sim deploy runs, same flags
    assert (vars(local) | {"host": "0.0.0.0", "port": args.port, "isolation": "process"}) == vars(args)
    server = services["superexec-serverapp"]
    assert parse("superexec", server["command"]).runtime_api_address == f"superlink:{args.port}"
    assert server["volumes"] == ["./runs:/app/runs"] and server["working_dir"] == "/app"
    partitions = []
    for i in range(nodes):
        node = parse("supernode", services[f"supernode-{i}"]["command"])
        assert services[f"supernode-{i}"]["image"] == f"flwr/supernode:{flwr}"
        assert node.superlink == f"superlink:{args.port}" and node.host == "0.0.0.0" and node.isolation == "process"
        config = dict(kv.split("=") for kv in node.node_config.split())
        assert int(config["num-partitions"]) == nodes
        partitions.append(int(config["partition-id"]))
        local = parse("supernode", supernode_command(i, nodes, "127.0.0.1:1234", port=4321)[1:])
        assert (vars(local) | {"superlink": node.superlink, "host": "0.0.0.0", "port": node.port,
                               "isolation": "process"}) == vars(node)
        app = parse("superexec", services[f"superexec-clientapp-{i}"]["command"])
        assert app.runtime_api_address == f"supernode-{i}:{node.port}"
    assert sorted(partitions) == list(range(nodes))
    images = {s["image"] for name, s in services.items() if name.startswith("superexec-")}
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(images) == 1 and f"ARG FLWR_VERSION={flwr}" in dockerfile
    assert "FROM flwr/superexec:${FLWR_VERSION}" in dockerfile and 'ENTRYPOINT ["flower-superexec"]' in dockerfile

    tls = committed["docker-compose.tls.yml"]["services"]
    assert tls.keys() == services.keys()
    for name, service in tls.items():
        kind = "superexec" if name.startswith("superexec") else name.split("-")[0]
        assert not parse(kind, service["command"]).insecure
        mount = service["volumes"][0].split(":")[1]
        assert all(a.startswith(mount + "/") for a in service["command"] if a.endswith((".crt", ".pem", ".key")))
    gpu = committed["docker-compose.gpu.yml"]["services"]["superexec-serverapp"]["deploy"]["resources"]
    assert gpu["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_certificates_name_every_host_and_chain_to_the_ca(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    from fl_sim.deploy.certificates import default_names, write_certificates

    tls = write_certificates(tmp_path / "certs", default_names(2) + ["gpu-host.example"])
    ca = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    server = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "superlink", "supernode-0", "supernode-1",
                                                            "gpu-host.example"}
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert server.issuer == ca.subject
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    assert oct(tls.key.stat().st_mode & 0o777) == "0o600"


@pytest.mark.slow
def test_a_tls_deployment_runs_with_certificates_and_no_insecure_connection(tmp_path, write_scenario):
    from fl_sim.deploy.certificates import default_names, write_certificates

    tls = write_certificates(tmp_path / "certs", default_names(0))
    folder, status = deploy_locally(write_scenario(small(rounds=1)), [], None, tmp_path / "tls", tls, echo=quiet)
    assert status == "finished"
    for log in (folder / "deploy-logs").iterdir():
        assert "insecure" not in log.read_text().lower(), log.name  # Flower warns about every insecure channel
    assert not processes_under(DEPLOY_TMP)
