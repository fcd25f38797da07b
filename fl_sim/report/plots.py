"""Matplotlib figures of leakage and utility over rounds, returned as PNG bytes (Agg backend, no display)."""

from __future__ import annotations

import io
import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from attacks import ATTACKS  # noqa: E402
from fl_sim.leakage.metrics import METRICS, SCORES  # noqa: E402
from fl_sim.report.tables import higher_is_better, label  # noqa: E402

UNIT_RANGE = {"ssim", "label_acc"}  # bounded scores get a fixed 0–1 axis so rounds and runs compare at a glance
RUN_STYLES = ["-", "--", ":", "-."]
RUN_MARKERS = ["o", "s", "^", "D"]


def attack_colors(attacks: list[str]) -> dict[str, str]:
    """One colour per attack, the same in every report: registered attacks by their place in the registry,
    other names (e.g. from an older run) in the colours left over."""
    palette = [matplotlib.colors.to_hex(c) for c in plt.get_cmap("tab10").colors + plt.get_cmap("Dark2").colors]
    registered = ATTACKS.names()
    fixed = {n: palette[registered.index(n) % len(palette)] for n in set(attacks) if n in registered}
    spare = [c for c in palette if c not in fixed.values()] or palette
    others = sorted(set(attacks) - set(fixed))
    return dict(sorted((fixed | {n: spare[i % len(spare)] for i, n in enumerate(others)}).items()))


def leakage_over_rounds(stats: pd.DataFrame, utility: dict[str, pd.DataFrame], colors: dict[str, str],
                        unavailable: dict[str, str]) -> bytes:
    """Stacked panels sharing the round axis: each score's mean over attacked clients (band: min–max),
    then the global model's test accuracy. ``stats``: tables.by_round; ``utility``: run → metrics.csv frame."""
    runs = list(utility)
    panels = [s for s in SCORES if METRICS.get(s).plotted and (s in set(stats["score"]) or s in unavailable)]
    heights = [0.4 if s not in set(stats["score"]) else 1.0 for s in panels] + [1.0]
    fig, axes = plt.subplots(len(panels) + 1, 1, figsize=(8, 1.9 * sum(heights) + 0.6), sharex=True, squeeze=False,
                             layout="constrained", gridspec_kw={"height_ratios": heights})
    axes = axes[:, 0]
    rounds = sorted(set(stats["round"]) | {r for m in utility.values() for r in m["round"]}) or [1]
    for ax, score in zip(axes, panels):
        ax.set_ylabel(f"{label(score)} {'↑' if higher_is_better(score) else '↓'}")
        rows = stats[stats["score"] == score]
        if rows.empty:
            ax.text(0.5, 0.5, textwrap.fill(f"{label(score)} unavailable: {unavailable[score]}", 100),
                    transform=ax.transAxes, ha="center", va="center", fontsize=7, color="0.3")
            ax.set_yticks([])
            continue
        for (run, attack), line in rows.groupby(["run", "attack"]):
            i = runs.index(run) % len(RUN_STYLES)
            ax.plot(line["round"], line["mean"], RUN_STYLES[i], marker=RUN_MARKERS[i], color=colors[attack], ms=4)
            ax.fill_between(line["round"], line["min"], line["max"], color=colors[attack], alpha=0.15, lw=0)
        if score in UNIT_RANGE:
            ax.set_ylim(min(0.0, float(rows["min"].min())) - 0.05, 1.05)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    ax = axes[-1]
    for i, (run, metrics) in enumerate(utility.items()):
        style = RUN_STYLES[i % len(RUN_STYLES)]
        ax.plot(metrics["round"], 100 * metrics["test_acc"], style, marker=RUN_MARKERS[i % 4], color="0.2", ms=4)
    ax.set_ylabel("test accuracy (%)")
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.5)
    handles = [Line2D([], [], color=c, lw=6, alpha=0.6, label=a) for a, c in colors.items()]
    if len(runs) > 1:
        handles += [Line2D([], [], color="0.2", ls=RUN_STYLES[i % 4], marker=RUN_MARKERS[i % 4], label=r)
                    for i, r in enumerate(runs)]
    if handles:
        title = "attack (line: mean over the attacked clients, band: min–max; ↑ / ↓: higher / lower = more leakage)"
        fig.legend(handles=handles, loc="outside upper center", ncol=min(len(handles), 4), frameon=False,
                   fontsize=8, title=title, title_fontsize=8)
    return png(fig)


def png(fig: plt.Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()
