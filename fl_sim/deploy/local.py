"""Flower's Deployment Engine: a SuperLink, one SuperNode per client, and the ServerApp with the attacks.

Three ways in, one set of command lines (so they cannot drift apart):

* ``fl-sim deploy SCENARIO --nodes N``: ``LocalDeployment`` starts the SuperLink and N SuperNodes as
  processes on loopback (each with its own FLWR_HOME and port), ``submit`` sends the run, and every
  process is torn down afterwards — also on Ctrl-C and on errors.
* ``fl-sim run --engine deployment --superlink HOST:PORT``: ``submit`` to a SuperLink already running.
* ``docker-compose.yml``: ``fl_sim.compose`` writes the same topology with Flower's images.

flwr 1.41 facts this relies on (measured): the SuperLink serves its Fleet, Control and Runtime APIs
over HTTP on one port (8000 by default); a SuperNode's Runtime API (where its SuperExec starts the
ClientApp) has its own port (9094 by default), so SuperNodes on one host need distinct ports; with the
default subprocess isolation the SuperLink and SuperNodes start ``flower-superexec`` from PATH.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import tomli_w

from fl_sim.base.errors import UserInputError

if TYPE_CHECKING:
    from fl_sim.scenario import Scenario

SUPERLINK_PORT = 8000
SUPERNODE_PORT = 9094
CONNECTION = "fl-sim"  # the SuperLink connection name written into the CLI's config.toml
FLOWER_APP = {  # [tool.flwr.app] of the app fl-sim submits (pyproject.toml has the same; tested)
    "publisher": "fl-sim",
    "components": {"serverapp": "fl_sim.federation.server:app", "clientapp": "fl_sim.federation.client:app"},
    "config": {"scenario": "scenarios/quickstart.toml", "scenario-text": "", "overrides": "", "out": ""},
}


@dataclass(frozen=True)
class Tls:
    """A folder of PEM files as ``fl-sim certificates`` (or Flower's example script) writes them:
    ``ca.crt`` (the CA everyone verifies against), ``server.pem`` and ``server.key`` (the SuperLink's
    and the SuperNodes' Runtime API certificate, whose SANs name every host it is reached as)."""

    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.folder / "server.pem"

    @property
    def key(self) -> Path:
        return self.folder / "server.key"

    def check(self) -> Tls:
        missing = [p.name for p in (self.ca, self.cert, self.key) if not p.is_file()]
        if missing:
            raise UserInputError(f"--certificates '{self.folder}' lacks {', '.join(missing)} "
                                 "(expected ca.crt, server.pem, server.key; make them with fl-sim certificates)")
        return self


def _serve(tls: Tls | None) -> list[str]:
    """Flags of a process that serves an API: TLS with its certificate, or --insecure."""
    if tls is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(tls.ca), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]


def _connect(tls: Tls | None) -> list[str]:
    """Flags of a process that connects to an API: verify against the CA, or --insecure."""
    return ["--insecure"] if tls is None else ["--root-certificates", str(tls.ca)]


def superlink_command(tls: Tls | None = None, host: str = "127.0.0.1", port: int = SUPERLINK_PORT) -> list[str]:
    """The SuperLink; runtime dependency installation off (the environment already has torch)."""
    return ["flower-superlink", *_serve(tls), "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"]


def supernode_command(partition: int, partitions: int, superlink: str, tls: Tls | None = None,
                      host: str = "127.0.0.1", port: int = SUPERNODE_PORT) -> list[str]:
    """SuperNode ``partition`` of ``partitions`` (node config partition-id / num-partitions = fl-sim's
    client id / number of clients), connecting to the SuperLink at ``superlink`` (host:port)."""
    serve = [] if tls is None else _serve(tls)  # its Runtime API, where its SuperExec connects
    return ["flower-supernode", *_connect(tls), *serve, "--superlink", superlink, "--host", host, "--port", str(port),
            "--node-config", f"partition-id={partition} num-partitions={partitions}"]


def superexec_command(runtime_api: str, tls: Tls | None = None) -> list[str]:
    """A SuperExec that starts ServerApps (runtime_api = the SuperLink) or ClientApps (= a SuperNode)."""
    return ["flower-superexec", *_connect(tls), "--runtime-api-address", runtime_api]


# --- local processes ----------------------------------------------------------------------------------
def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that were free on loopback a moment ago."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def wait_listening(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def processes_under(root: Path) -> list[psutil.Process]:
    """Every process whose FLWR_HOME lies under ``root``: what a deployment started, however deep."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("FLWR_HOME", "").startswith(str(root)):
                found.append(proc)
    return found


def terminate(procs: list[psutil.Process], grace: float = 10.0) -> None:
    """SIGTERM the processes and their children, SIGKILL what is left after ``grace`` seconds."""
    tree = {p.pid: p for p in procs}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            tree.update({c.pid: c for c in p.children(recursive=True)})
    for p in tree.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(list(tree.values()), timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=grace)


@dataclass
class LocalDeployment:
    """SuperLink + ``nodes`` SuperNodes as local processes; logs in ``root/<process>.log``.

    Use as a context manager: leaving it (normally, on an error or on Ctrl-C) stops every process
    started under ``root``, the SuperExecs and app processes Flower spawned included."""

    root: Path
    nodes: int
    tls: Tls | None = None
    superlink: str = ""
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __enter__(self) -> LocalDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        link_port, *node_ports = free_ports(self.nodes + 1)
        self.superlink = f"127.0.0.1:{link_port}"
        self._spawn("superlink", superlink_command(self.tls, port=link_port))
        wait_listening(link_port)
        for i, port in enumerate(node_ports):
            self._spawn(f"supernode-{i}", supernode_command(i, self.nodes, self.superlink, self.tls, port=port))

    def _spawn(self, name: str, command: list[str]) -> None:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{name}.log", "wb") as log:
            self.procs[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=flower_env(home),
                                                start_new_session=True)

    def kill_node(self, partition: int) -> None:
        """Stop SuperNode ``partition`` (and what it started) as a crash of that client would."""
        proc = self.procs.pop(f"supernode-{partition}")
        home = str(self.root / f"supernode-{partition}")
        terminate([psutil.Process(proc.pid)] + [p for p in processes_under(self.root)
                                                 if _environ(p).get("FLWR_HOME", "").startswith(home)])

    def stop(self) -> None:
        procs = []
        for proc in self.procs.values():
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(proc.pid))
        terminate(procs + processes_under(self.root))
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def flower_env(home: Path) -> dict[str, str]:
    """This environment with FLWR_HOME = ``home`` and the venv's scripts first on PATH (Flower starts
    flower-superexec and the app processes by name)."""
    scripts = str(Path(sys.executable).parent)
    return os.environ | {"FLWR_HOME": str(home), "PATH": scripts + os.pathsep + os.environ.get("PATH", ""),
                         "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


# --- submitting a run -----------------------------------------------------------------------------------
def write_app(folder: Path) -> Path:
    """A Flower app folder (pyproject.toml only): the FAB carries configuration; fl-sim itself and torch
    come from the environment the SuperLink and SuperNodes run in."""
    folder.mkdir(parents=True, exist_ok=True)
    project = {"build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
               "project": {"name": "fl-sim", "version": version("fl-sim"), "dependencies": []},
               "tool": {"flwr": {"app": FLOWER_APP}}}
    (folder / "pyproject.toml").write_text(tomli_w.dumps(project))
    return folder


def write_connection(home: Path, superlink: str, ca: Path | None) -> Path:
    """FLWR_HOME/config.toml naming the SuperLink (Flower >= 1.26 keeps connections there)."""
    home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, object] = {"address": superlink}
    conn |= {"insecure": True} if ca is None else {"root-certificates": str(ca.resolve())}
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))
    return home


def check_address(superlink: str) -> str:
    host, sep, port = superlink.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserInputError(f"--superlink '{superlink}' is not HOST:PORT (e.g. 127.0.0.1:{SUPERLINK_PORT})")
    return superlink


def submit(work: Path, superlink: str, scenario_text: str, overrides: list[str], out: Path | None,
           ca: Path | None = None,
           echo: Callable[[str], None] = lambda line: print(line, end="", file=sys.stderr)) -> int:
    """``flwr run`` the scenario on the SuperLink at ``superlink`` and stream its logs; returns flwr's exit code.

    The scenario travels as text in the run config, so it need not exist where the apps run; ``out`` is
    the run folder on the machine of the ServerApp (None: its default, runs/<name>-<time>)."""
    app = write_app(work / "app")
    home = write_connection(work / "cli", superlink, ca)
    run_config = work / "run-config.toml"
    run_config.write_text(tomli_w.dumps({"scenario-text": scenario_text, "overrides": ";".join(overrides),
                                         "out": "" if out is None else str(out)}))
    command = ["flwr", "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=flower_env(home),
                          text=True, start_new_session=True) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                echo(line)
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
                proc.kill()


@contextlib.contextmanager
def keep_logs(deployment: LocalDeployment, out: Path) -> Iterator[None]:
    """Copy the processes' logs into ``out/deploy-logs`` when the deployment ends (whatever the outcome)."""
    try:
        yield
    finally:
        logs = out / "deploy-logs"
        with contextlib.suppress(OSError):
            logs.mkdir(parents=True, exist_ok=True)
            for log in deployment.root.glob("*.log"):
                shutil.copyfile(log, logs / log.name)


# --- what the CLI runs -----------------------------------------------------------------------------------
def scenario_text(path: Path, overrides: list[str]) -> tuple[str, Scenario]:
    """The scenario file's TOML (its name made explicit) and the validated scenario with ``overrides``."""
    import tomllib

    from fl_sim.scenario import load_scenario

    loaded = load_scenario(path, overrides)  # ScenarioError (exit 2) before anything starts
    raw = tomllib.loads(path.read_text())
    raw.setdefault("name", path.stem)
    return tomli_w.dumps(raw), loaded


def run_outcome(out: Path, code: int) -> str:
    """How a submitted run ended, from its run folder (or flwr's exit code when it wrote none)."""
    import json

    if (out / "run.json").is_file():
        return str(json.loads((out / "run.json").read_text()).get("status", "unknown"))
    return f"no run folder (flwr run exited with {code})"


def deploy_locally(path: Path, overrides: list[str], nodes: int | None, out: Path | None, tls: Tls | None,
                   echo: Callable[[str], None] | None = None,
                   during: Callable[[LocalDeployment, Path], None] | None = None) -> tuple[Path, str]:
    """``fl-sim deploy``: SuperLink + one SuperNode per client on loopback, the run submitted and streamed,
    everything torn down. ``during(deployment, out)`` runs beside the run (tests use it to kill a node).
    Returns (run folder, how the run ended)."""
    import tempfile
    import threading

    from fl_sim.federation.setup import prepare
    from fl_sim.store import RunStore

    if nodes is not None:
        overrides = [*overrides, f"federation.num_clients={nodes}"]
    text, scenario = scenario_text(path, overrides)
    prepare(scenario)  # the data fits the federation: checked before any process starts
    out = (out or RunStore.default_dir(scenario)).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"--out '{out}' already exists and is not empty; choose a new folder")
    kwargs = {} if echo is None else {"echo": echo}
    try:
        with tempfile.TemporaryDirectory(prefix="fl-sim-deploy-") as work, \
                LocalDeployment(Path(work), scenario.federation.num_clients, tls) as deployment, \
                keep_logs(deployment, out):
            side = threading.Thread(target=during, args=(deployment, out), daemon=True) if during else None
            if side is not None:
                side.start()
            code = submit(Path(work), deployment.superlink, text, overrides, out, tls.ca if tls else None, **kwargs)
            if side is not None:
                side.join()
    except KeyboardInterrupt:
        mark_interrupted(out)
        raise
    return out, run_outcome(out, code)


def mark_interrupted(out: Path) -> None:
    """After Ctrl-C tore the deployment down: the run folder keeps its finished rounds, says so, has its report."""
    from fl_sim.report import report_after_run
    from fl_sim.store import RunStore

    if (out / "run.json").is_file() and RunStore(out).state().get("status") == "running":
        RunStore(out).end("interrupted")
        report_after_run(out)
