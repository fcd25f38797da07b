"""The scenario and the run's timings in short: (topic, sentence) pairs for the report's first table."""

from __future__ import annotations

import pandas as pd

from fl_sim.report.runs import RunData
from fl_sim.scenario import ComponentSpec, Scenario


def _components(specs: list[ComponentSpec]) -> str:
    if not specs:
        return "none"
    parts = []
    for spec in specs:
        params = ", ".join(f"{k}={v}" for k, v in (spec.model_extra or {}).items())
        name = spec.name if spec.label is None else f"{spec.label} = {spec.name}"
        parts.append(f"{name} ({params})" if params else name)
    return "; ".join(parts)


def scenario_facts(s: Scenario) -> list[tuple[str, str]]:
    f, t, d, m, tm = s.federation, s.training, s.data, s.model, s.threat_model
    partition = f"Dirichlet(α = {d.alpha:g})" if d.partition == "dirichlet" else "IID"
    data = f"{d.dataset}, {partition} shards, {d.holdout_fraction:.0%} of each shard held out for evaluation"
    data += "" if d.normalize else ", un-normalised model input"
    model = m.name + (" (ImageNet weights)" if m.pretrained else "") + (f" from {m.weights}" if m.weights else "")
    if t.protocol == "fedsgd":
        protocol = f"FedSGD: one gradient on a batch of {t.batch_size}, server step lr {t.lr:g}"
    else:
        steps = f"{t.local_epochs} local epochs" if t.local_epochs else f"{t.local_steps} local steps"
        protocol = f"FedAvg: {steps} of {t.optimizer} (lr {t.lr:g}"
        protocol += f", momentum {t.momentum:g}" if t.momentum else ""
        protocol += f", weight decay {t.weight_decay:g}" if t.weight_decay else ""
        protocol += f") on batches of {t.batch_size}; the client sends its weights"
    which = lambda v: "all" if v == "all" else ", ".join(map(str, v))  # noqa: E731
    threat = (f"honest-but-curious server; attacks rounds {which(tm.rounds)}, clients {which(tm.clients)}; "
              f"keeps the observations of {'every client' if tm.record == 'all' else 'attacked clients'}")
    return [
        ("federation", f"{f.num_clients} clients, {f.clients_per_round} per round, {f.rounds} rounds; "
                       f"engine {s.engine}, seed {s.seed}"),
        ("data", data), ("model", model), ("protocol", protocol), ("threat model", threat),
        ("attacks", _components(s.attacks)), ("defenses", _components(s.defenses)),
        ("metrics", ", ".join(s.metrics) + ", label accuracy"),
    ]


def timing_facts(run: RunData, recs: pd.DataFrame) -> list[tuple[str, str]]:
    facts = [("status", f"{run.state.get('status', '?')}: {run.last_round} of {run.rounds} rounds finished")]
    duration = run.duration_seconds()
    started = run.state.get("started", "?")
    facts.append(("wall time", f"started {started}" + (f", {duration:.1f} s" if duration is not None else "")))
    if not run.metrics.empty:
        seconds = pd.to_numeric(run.metrics["round_seconds"], errors="coerce")
        facts.append(("rounds", f"{seconds.sum():.1f} s in all, {seconds.mean():.2f} s per round (with attacks); "
                                f"recording {pd.to_numeric(run.metrics['record_seconds']).sum():.2f} s"))
    if not recs.empty and "seconds" in recs:
        per_attack = recs.groupby("attack")["seconds"].agg(["sum", "mean", "count"])
        facts.append(("attack time", "; ".join(f"{a} {row['sum']:.1f} s over {int(row['count'])} reconstructions "
                                           f"({row['mean']:.2f} s each)" for a, row in per_attack.iterrows())))
    return facts
