"""fl-sim command line: run scenarios, list components."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spin-waiting slows double-backward 5–20×

import logging
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from fl_sim.base.errors import UserInputError

if TYPE_CHECKING:
    from fl_sim.scenario import Scenario
    from fl_sim.store import RunStore

    Runner = Callable[[Scenario, RunStore, Callable[[int], None] | None], None]

log = logging.getLogger("fl_sim")


def main() -> None:
    """Console-script entry point: user errors → one line on stderr, exit code 2."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except UserInputError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """fl-sim: how much private data an honest-but-curious FL server can reconstruct."""


@cli.command()
@click.argument("scenario", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a scenario key, e.g. --set federation.rounds=5 (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default runs/<name>-<time>).")
@click.option("--engine", metavar="NAME", help="Override the scenario's engine (see fl-sim list); deployment submits "
              "to --superlink.")
@click.option("--superlink", metavar="HOST:PORT", help="With --engine deployment: a running SuperLink.")
@click.option("--root-certificates", type=click.Path(dir_okay=False, path_type=Path),
              help="With --superlink: the CA certificate to verify it by (TLS); without, the connection is insecure.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), help="Continue an unfinished run folder.")
@click.option("-v", "--verbose", count=True, help="More logs on the console (-v: info, -vv: debug).")
def run(scenario: Path | None, overrides: tuple[str, ...], out: Path | None, engine: str | None,
        superlink: str | None, root_certificates: Path | None, resume: Path | None, verbose: int) -> None:
    """Run a federation from a SCENARIO file and record what the server observes."""
    from fl_sim.base.logs import configure_console

    configure_console(verbose)
    if engine == "deployment" or superlink is not None:
        return submit_to_superlink(scenario, list(overrides), out, superlink, root_certificates, resume)
    from fl_sim.federation.server import run_engine
    from fl_sim.federation.setup import prepare
    from fl_sim.scenario import load_scenario
    from fl_sim.store import RunStore

    if resume is not None:
        if scenario is not None or overrides or out is not None:
            raise UserInputError("--resume takes the scenario from the run folder: drop SCENARIO, --set and --out")
        store = RunStore.open(resume, "--resume")
        loaded = store.scenario()
        if store.last_round >= loaded.federation.rounds:
            click.echo(f"{resume}: all {loaded.federation.rounds} rounds are finished; nothing to resume")
            return
    elif scenario is None:
        raise UserInputError("missing SCENARIO (a .toml file) or --resume RUN_DIR")
    else:
        loaded = load_scenario(scenario, overrides)
    if engine is not None:
        loaded = with_engine(loaded, engine)
    fed = prepare(loaded)  # loads data and checks the federation fits it: fails before anything is written
    if resume is None:
        store = RunStore.create(loaded, out)
    else:
        store.discard_unfinished()
    from fl_sim.base.logs import run_log

    with run_log(store.root):
        execute(loaded, store, partial(run_engine, fed=fed))
    click.echo(f"run folder: {store.root}")


def with_engine(scenario: Scenario, engine: str) -> Scenario:
    """``scenario`` on another engine, validated like the scenario key ``engine``."""
    from fl_sim.scenario import scenario_from_dict

    return scenario_from_dict(scenario.to_toml_dict() | {"engine": engine})


def execute(scenario: Scenario, store: RunStore, runner: Runner) -> None:
    """Run the federation (``runner(scenario, store, progress)``) with a round progress bar; record how the
    run ended in run.json."""
    from tqdm import tqdm

    from fl_sim.report import report_after_run

    rounds = scenario.federation.rounds
    with tqdm(total=rounds, initial=store.last_round, desc=f"{scenario.name} rounds", unit="round",
              file=sys.stderr, leave=True) as bar:
        def progress(server_round: int) -> None:
            bar.update(server_round - bar.n)

        try:
            runner(scenario, store, progress)
        except KeyboardInterrupt:
            store.end("interrupted")
            report_after_run(store.root)
            click.echo(f"\ninterrupted: rounds 1..{store.last_round} are kept; continue with "
                       f"fl-sim run --resume {store.root}", err=True)
            raise SystemExit(130) from None
        except Exception:
            store.end("failed")
            log.exception("run failed")
            raise
    store.end("finished" if store.last_round >= rounds else "incomplete")
    if (report := report_after_run(store.root)) is not None:
        click.echo(f"report: {report}")


def submit_to_superlink(scenario: Path | None, overrides: list[str], out: Path | None, superlink: str | None,
                        root_certificates: Path | None, resume: Path | None) -> None:
    """`fl-sim run --engine deployment --superlink HOST:PORT`: the run folder is written where the ServerApp runs."""
    import tempfile

    from fl_sim.deploy.local import check_address, scenario_text, submit

    if superlink is None:
        raise UserInputError("--engine deployment needs --superlink HOST:PORT (or use fl-sim deploy for a local one)")
    if resume is not None or scenario is None:
        raise UserInputError("--engine deployment takes a SCENARIO file (no --resume)")
    if root_certificates is not None and not root_certificates.is_file():
        raise UserInputError(f"--root-certificates '{root_certificates}' is not a file")
    text, _ = scenario_text(scenario, overrides)
    with tempfile.TemporaryDirectory(prefix="fl-sim-submit-") as work:
        code = submit(Path(work), check_address(superlink), text, overrides, out, root_certificates)
    where = out or "runs/<name>-<time>"
    click.echo(f"run folder (on the ServerApp's machine): {where}")
    if code != 0:
        raise SystemExit(code)


@cli.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--nodes", type=click.IntRange(min=1), help="SuperNodes, one per client (sets federation.num_clients; "
              "default: the scenario's).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a scenario key (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Run folder (default runs/<name>-<time>).")
@click.option("--certificates", type=click.Path(file_okay=False, path_type=Path),
              help="TLS: a folder with ca.crt, server.pem, server.key (fl-sim certificates); default: --insecure.")
def deploy(scenario: Path, nodes: int | None, overrides: tuple[str, ...], out: Path | None,
           certificates: Path | None) -> None:
    """Run SCENARIO on Flower's Deployment Engine: a SuperLink and one SuperNode per client as local processes."""
    from fl_sim.deploy.local import Tls, deploy_locally

    tls = Tls(certificates).check() if certificates is not None else None
    try:
        folder, status = deploy_locally(scenario, list(overrides), nodes, out, tls)
    except KeyboardInterrupt:
        click.echo("\ninterrupted: every deployment process is stopped; finished rounds are kept in the run folder",
                   err=True)
        raise SystemExit(130) from None
    click.echo(f"run folder: {folder}")
    if (folder / "report.html").is_file():
        click.echo(f"report: {folder / 'report.html'}")
    if status != "finished":
        click.echo(f"error: the deployed run ended '{status}'; the processes' logs are in {folder / 'deploy-logs'}",
                   err=True)
        raise SystemExit(1)


@cli.command()
@click.option("--nodes", type=click.IntRange(min=1), required=True, help="SuperNodes (one per client).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("."), show_default=True,
              help="Folder for docker-compose.yml and its TLS and GPU overlays.")
def compose(nodes: int, out: Path) -> None:
    """Write docker-compose.yml (+ .tls / .gpu overlays) for a SuperLink, the ServerApp and NODES SuperNodes."""
    from fl_sim.deploy.compose import write

    for path in write(out, nodes):
        click.echo(f"wrote {path}")


@cli.command()
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--nodes", type=click.IntRange(min=0), default=4, show_default=True,
              help="Name supernode-0 .. supernode-(N-1) (docker-compose's services) in the certificate.")
@click.option("--host", "hosts", multiple=True, metavar="NAME", help="Another DNS name or IP the APIs are reached at.")
def certificates(folder: Path, nodes: int, hosts: tuple[str, ...]) -> None:
    """Write a CA and a server certificate for TLS deployments into FOLDER (prototyping only)."""
    from fl_sim.deploy.certificates import default_names, write_certificates

    if folder.exists() and not folder.is_dir():
        raise UserInputError(f"FOLDER '{folder}' is a file; give a folder")
    names = default_names(nodes) + list(hosts)
    tls = write_certificates(folder, names)
    click.echo(f"wrote {tls.ca}, {tls.cert}, {tls.key} for {', '.join(names)}")


@cli.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--attack", "attack_name", required=True, help="Registered attack name (see fl-sim list).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override an attack preset value, e.g. --set iterations=2000 (repeatable).")
@click.option("-v", "--verbose", count=True, help="More logs on the console.")
def attack(run_dir: Path, attack_name: str, overrides: tuple[str, ...], verbose: int) -> None:
    """Run an attack on a saved run's observations; rows are appended to its results.csv (model attacks such
    as tldr: on the final global model, to inversion.csv)."""
    from pydantic import ValidationError

    from attacks import Target, build_attack, targets
    from fl_sim.base.logs import configure_console, run_log
    from fl_sim.federation.setup import prepare
    from fl_sim.leakage.model_attacks import InversionRunner
    from fl_sim.leakage.observation_attacks import LeakageRunner
    from fl_sim.scenario import ComponentSpec, one_line, parse_value
    from fl_sim.store import RunStore, load_observations

    configure_console(verbose)
    store = RunStore.open(run_dir)
    scenario = store.scenario()
    params = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise UserInputError(f"--set expects key=value, got '{item}'")
        params[key.strip()] = parse_value(text)
    try:
        built = build_attack(attack_name, params)
    except ValidationError as err:
        raise UserInputError(one_line(err, prefix="--set ")) from None
    except ValueError as err:  # unknown attack name
        raise UserInputError(f"--attack: {err}") from None
    why = scenario.refusal(built)
    if why:
        raise UserInputError(f"--attack {attack_name}: {why}")
    fed = prepare(scenario)
    if targets(attack_name) == Target.GLOBAL_MODEL:  # TLDR: the global model after the last finished round
        state = store.checkpoint()
        if state is None:
            raise UserInputError(f"{run_dir}: no finished round, so no global model to invert")
        with run_log(store.root):
            InversionRunner(scenario, fed, store, [ComponentSpec(name=attack_name, **params)]).run(
                store.last_round, state)
        click.echo(f"appended {attack_name} rows for round {store.last_round} to {store.layout.inversion_rows}")
        return
    runner = LeakageRunner(scenario, fed, store, [ComponentSpec(name=attack_name, **params)])
    rounds = [r for r in store.layout.observed_rounds() if r <= store.last_round]
    if not rounds:
        raise UserInputError(f"{run_dir}: no finished round has saved observations to attack")
    with run_log(store.root):
        for server_round in rounds:
            runner(server_round, list(load_observations(store.root, rounds={server_round})))
    click.echo(f"appended {attack_name} rows for rounds {rounds[0]}..{rounds[-1]} to {store.layout.results}")
    from fl_sim.report import report_after_run

    if (report := report_after_run(store.root)) is not None:
        click.echo(f"report: {report}")


@cli.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path),
              help="Report folder (default: the run folder for one run, report-<time> beside the first for several).")
@click.option("--recovered", default="ssim>=0.5", show_default=True, metavar="METRIC>=VALUE",
              help="When a reconstruction counts as recognisably recovered (also METRIC<=VALUE, e.g. avd<=0.3).")
def report(run_dirs: tuple[Path, ...], out: Path | None, recovered: str) -> None:
    """Build report.html + report.md for one run, or several runs side by side."""
    from fl_sim.report import RecoveryRule, build_report

    rule = RecoveryRule.parse(recovered)
    if out is not None and out.exists() and not out.is_dir():
        raise UserInputError(f"--out '{out}' is a file; give a folder")
    click.echo(f"report: {build_report(list(run_dirs), out, rule)}")


@cli.command()
@click.argument("scenario", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a scenario key (repeatable).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Comparison folder (default runs/<name>-compare-<time>); an existing one is resumed.")
@click.option("--engine", type=click.Choice(["inprocess", "simulation"]), help="Override the scenario's engine.")
@click.option("-v", "--verbose", count=True, help="More logs on the console.")
def compare(scenario: Path, overrides: tuple[str, ...], out: Path | None, engine: str | None, verbose: int) -> None:
    """Run SCENARIO under every [compare] defense setting; write one privacy–utility comparison report."""
    from datetime import datetime

    from fl_sim.base.logs import configure_console, run_log
    from fl_sim.federation.server import run_engine
    from fl_sim.federation.setup import prepare
    from fl_sim.report.comparison import build_comparison
    from fl_sim.scenario import load_scenario
    from fl_sim.scenario.comparison import setting_scenario, setting_slug, settings
    from fl_sim.store import ComparisonLayout, RunLayout, RunStore

    configure_console(verbose)
    loaded = load_scenario(scenario, overrides)
    if engine is not None:
        loaded = with_engine(loaded, engine)
    if len(settings(loaded)) < 2:
        raise UserInputError("scenario key 'compare.defenses': nothing to compare; add [[compare.defenses]] entries, "
                             "e.g. {name = 'dp', sigma = [0.001, 0.01]}, or [compare.grid] keys, e.g. "
                             "\"training.batch_size\" = [1, 4]")
    if out is None:
        out = Path(loaded.output.dir) / f"{loaded.name}-compare-{datetime.now():%Y%m%d-%H%M%S}"
    layout = ComparisonLayout(out)
    if out.exists() and any(out.iterdir()) and not layout.runs.is_dir():
        raise UserInputError(f"--out '{out}' exists and is not a comparison folder; choose a new folder")
    prepare(loaded)  # the data fits the federation: checked before any setting runs

    planned = [(layout.setting(i, setting_slug(d)), d) for i, d in enumerate(settings(loaded))]
    setting_scenarios = [setting_scenario(loaded, d, folder.name) for folder, d in planned]  # all valid up front
    folders = []
    for (folder, _), setting in zip(planned, setting_scenarios, strict=True):  # finished settings are kept
        folders.append(folder)
        if RunLayout(folder).state.is_file():
            store = RunStore.open(folder)
            if (changed := _changed_key(store.scenario(), setting)) is not None:
                raise UserInputError(f"--out '{out}': setting {folder.name} ran with another scenario ({changed} "
                                     "differs); choose a new folder to compare this one")
            if store.status == "finished":
                log.info("%s: finished earlier, kept", folder.name)
                continue
            store.discard_unfinished()
        else:
            store = RunStore.create(setting, folder)
        click.echo(f"setting {folder.name}", err=True)
        with run_log(store.root):
            execute(store.scenario(), store, run_engine)
    report = build_comparison(out, folders, loaded.name, loaded.compare.metric, list(loaded.compare.grid))
    click.echo(f"comparison: {report}")


def _changed_key(ran: Any, planned: Any) -> str | None:
    """The first dotted key whose value differs between two resolved scenarios (``output`` aside), or None."""
    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(node, dict):
            return {prefix: node}
        return {k: v for key, value in node.items() for k, v in flat(value, f"{prefix}{key}.").items()}

    a, b = (flat({k: v for k, v in sc.to_toml_dict().items() if k != "output"}) for sc in (ran, planned))
    return next((k.rstrip(".") for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)), None)


@cli.command(name="list")
def list_components() -> None:
    """Datasets (with availability here), models, attacks, defenses, metrics, engines."""
    from attacks import ATTACKS
    from defenses import DEFENSES
    from fl_sim.data.partition import PARTITIONS
    from fl_sim.data.sources import DATASETS
    from fl_sim.engines import ENGINES
    from fl_sim.leakage.metrics import METRICS
    from fl_sim.models import MODELS

    click.echo("datasets:")
    for name, src in DATASETS.items():
        reason = src.missing(None)
        where = "offline" if src.offline else "full"
        state = "available" if reason is None else f"not here: {reason}"
        click.echo(f"  {name:22s} [{where}, {state}] {src.description}")
    click.echo("models:")
    for name, spec in MODELS.items():
        click.echo(f"  {name:22s} {spec.description}")
    for title, registry in (("attacks", ATTACKS), ("defenses", DEFENSES), ("metrics", METRICS),
                            ("partitions", PARTITIONS), ("engines", ENGINES)):
        names = registry.names()
        click.echo(f"{title}: {', '.join(names) if names else '(none in this version)'}")


if __name__ == "__main__":
    main()
