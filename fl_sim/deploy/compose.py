"""docker-compose files for the deployment topology, from the command lines ``fl-sim deploy`` runs.

Flower's images for the pinned version: ``flwr/superlink`` and ``flwr/supernode`` (entrypoints
flower-superlink / flower-supernode) and the app image built from ``Dockerfile`` on ``flwr/superexec``
(entrypoint flower-superexec, with fl-sim and torch installed). In containers every API binds to
0.0.0.0 and each process is its own service (``--isolation process``): one SuperExec beside the
SuperLink starts the ServerApp (the attacks; the run folder is on its ``./runs`` volume), one beside
each SuperNode starts its ClientApp. Overlays: TLS (certificates from ``./certificates``, no
--insecure anywhere) and a GPU reservation for the ServerApp's container.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from fl_sim.deploy.local import (
    SUPERLINK_PORT,
    SUPERNODE_PORT,
    Tls,
    superexec_command,
    superlink_command,
    supernode_command,
)

APP_IMAGE = "fl-sim-app:latest"
CERTIFICATES = "/app/certificates"  # where the TLS overlay mounts ./certificates
RUNS = "/app/runs"  # the ServerApp's working directory is /app: run folders land in ./runs
FILES = {"base": "docker-compose.yml", "tls": "docker-compose.tls.yml", "gpu": "docker-compose.gpu.yml"}
HEADER = ("# Written by `fl-sim compose --nodes {nodes}`; change the topology with that command, not by hand.\n"
          "# {usage}\n")


def _commands(nodes: int, tls: Tls | None) -> dict[str, list[str]]:
    """service → its command (the arguments after the image's entrypoint)."""
    link = f"superlink:{SUPERLINK_PORT}"
    commands = {"superlink": superlink_command(tls, "0.0.0.0")[1:] + ["--isolation", "process"],
                "superexec-serverapp": superexec_command(link, tls)[1:]}
    for i in range(nodes):
        commands[f"supernode-{i}"] = supernode_command(i, nodes, link, tls, "0.0.0.0")[1:] + ["--isolation", "process"]
        commands[f"superexec-clientapp-{i}"] = superexec_command(f"supernode-{i}:{SUPERNODE_PORT}", tls)[1:]
    return commands


def base(nodes: int) -> dict[str, Any]:
    flwr = version("flwr")
    services: dict[str, Any] = {}
    for name, command in _commands(nodes, None).items():
        service: dict[str, Any] = {"command": command, "restart": "on-failure"}
        if name == "superlink":
            service |= {"image": f"flwr/superlink:{flwr}", "ports": [f"{SUPERLINK_PORT}:{SUPERLINK_PORT}"]}
        elif name.startswith("supernode-"):
            service |= {"image": f"flwr/supernode:{flwr}", "depends_on": ["superlink"]}
        else:  # a SuperExec: the app image (built once, reused by every SuperExec)
            service |= {"image": APP_IMAGE, "build": {"context": ".", "args": {"FLWR_VERSION": flwr}},
                        "depends_on": [name.replace("superexec-clientapp", "supernode")
                                       if "clientapp" in name else "superlink"]}
            if name == "superexec-serverapp":
                service |= {"volumes": [f"./runs:{RUNS}"], "working_dir": "/app"}
        services[name] = service
    return {"services": services}


def tls_overlay(nodes: int) -> dict[str, Any]:
    """Every service's command with certificates instead of --insecure, and the certificates mounted."""
    tls = Tls(Path(CERTIFICATES))
    return {"services": {name: {"command": command, "volumes": [f"./certificates:{CERTIFICATES}:ro"]}
                         for name, command in _commands(nodes, tls).items()}}


def gpu_overlay() -> dict[str, Any]:
    device = {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    return {"services": {"superexec-serverapp": {"deploy": {"resources": {"reservations": {"devices": [device]}}}}}}


def render(nodes: int) -> dict[str, str]:
    """file name → YAML text of the base file and its overlays for ``nodes`` SuperNodes."""
    usage = {"base": "docker compose up --build -d   (then: fl-sim run SCENARIO --superlink 127.0.0.1:8000)",
             "tls": "docker compose -f docker-compose.yml -f docker-compose.tls.yml up --build -d",
             "gpu": "docker compose -f docker-compose.yml -f docker-compose.gpu.yml up --build -d"}
    docs = {"base": base(nodes), "tls": tls_overlay(nodes), "gpu": gpu_overlay()}
    return {FILES[key]: HEADER.format(nodes=nodes, usage=usage[key]) + yaml.safe_dump(doc, sort_keys=False, width=120)
            for key, doc in docs.items()}


def write(folder: Path, nodes: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render(nodes).items():
        (folder / name).write_text(text)
        written.append(folder / name)
    return written
