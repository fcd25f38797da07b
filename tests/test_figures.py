"""Figures a reader can read: no two texts of the privacy–utility plot overlap, none leaves the figure."""

import itertools

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.text import Text

from fl_sim.report.comparison import panel_line, privacy_utility_figure
from fl_sim.report.plots import attack_colors


def text_boxes(fig: plt.Figure) -> list[tuple[str, object]]:
    """(text, window extent) of every text the figure draws: visible, non-empty, tick labels only for ticks inside
    the axis limits (matplotlib keeps the others, undrawn)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ticks, drawn = set(), []
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            lo, hi = sorted(limits)
            for tick in axis.get_major_ticks() + axis.get_minor_ticks():
                ticks |= {tick.label1, tick.label2}
                drawn += [t for t in (tick.label1, tick.label2) if t.get_visible() and lo <= tick.get_loc() <= hi]
    drawn += [t for t in fig.findobj(Text) if t not in ticks and t.get_visible()]
    return [(t.get_text(), t.get_window_extent(renderer)) for t in drawn if t.get_text().strip()]


def problems(fig: plt.Figure) -> list[str]:
    boxes = text_boxes(fig)
    frame = fig.bbox
    found = [f"outside: {t!r}" for t, b in boxes
             if b.x0 < frame.x0 - 1 or b.y0 < frame.y0 - 1 or b.x1 > frame.x1 + 1 or b.y1 > frame.y1 + 1]
    for (ta, a), (tb, b) in itertools.combinations(boxes, 2):
        if a.x0 < b.x1 - 1 and b.x0 < a.x1 - 1 and a.y0 < b.y1 - 1 and b.y0 < a.y1 - 1:
            found.append(f"overlap: {ta!r} / {tb!r}")
    return found


def many_settings() -> pd.DataFrame:
    """12 settings × 2 attacks: three settings at one point, others crowded near it, one far away."""
    rng = np.random.default_rng(0)
    names = ["none", *(f"dp(sigma={s:g})" for s in (0.001, 0.01, 0.1, 1)), *(f"prune(ratio={r:g})" for r in
             (0.1, 0.5, 0.9)), "quantize(bits=4)", "soteria(ratio=0.6)", "secagg", "dp-sgd(sigma=1)"]
    rows = []
    for i, name in enumerate(names):
        for attack in ("dlg", "idlg"):
            crowded = i in (0, 5, 8)  # identical utility and leakage
            rows.append({"setting": name, "defense": name.split("(")[0], "attack": attack,
                         "final_test_acc": 0.289 if crowded else 0.18 + 0.01 * i + rng.normal(0, 0.002),
                         "ssim_mean": 1.0 if crowded else (0.02 if i == 11 else 0.2 + 0.05 * (i % 4)),
                         "ssim_std": 0.0 if crowded else 0.05, "reconstructions": 4})
    return pd.DataFrame(rows)


def test_privacy_utility_labels_never_overlap_or_leave_the_figure():
    table = many_settings()
    fig = privacy_utility_figure(table, "ssim", attack_colors(["dlg", "idlg"]))
    assert problems(fig) == []
    labels = [t for t, _ in text_boxes(fig)]
    assert "1, 6, 9" in labels  # the three settings at one point share one label
    assert {str(n) for n in range(1, 13) if n not in (1, 6, 9)} <= set(labels) and "better ↘" in labels
    legend = fig.axes[0].get_legend().get_window_extent()
    assert legend.x0 >= fig.axes[0].get_window_extent().x1  # the legend sits outside the data
    plt.close(fig)


def test_the_overlap_check_catches_labels_at_their_points():
    table = many_settings()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))  # the old figure: full names at each point
    for row in table.itertuples():
        ax.plot(100 * row.final_test_acc, row.ssim_mean, "o")
        ax.annotate(row.setting, (100 * row.final_test_acc, row.ssim_mean), xytext=(4, 4), textcoords="offset points")
    ax.text(0.9, 0.5, "a label that runs past the right edge of the figure", transform=ax.transAxes)
    found = problems(fig)
    assert any(p.startswith("overlap") for p in found) and any(p.startswith("outside") for p in found)
    plt.close(fig)


def test_a_swept_key_point_of_one_setting_shows_its_reconstructions_spread_and_of_several_their_means_spread():
    rows = pd.DataFrame({"sigma": [0.1, 0.01, 0.01], "psnr_mean": [12.0, 20.0, 30.0], "psnr_std": [1.5, 2.0, 4.0],
                         "images_recovered_fraction": [0.0, 0.5, 1.0]})
    line = panel_line(rows, "sigma", "psnr_mean", [0.01, 0.1, 1.0])
    assert list(line.index) == [0.01, 0.1]  # the values' order; a value without rows is left out
    assert line.loc[0.01, "mean"] == 25.0 and line.loc[0.01, "std"] == np.std([20.0, 30.0], ddof=1)
    assert line.loc[0.1, "mean"] == 12.0 and line.loc[0.1, "std"] == 1.5  # one setting: its own std
    fraction = panel_line(rows, "sigma", "images_recovered_fraction", [0.01, 0.1])
    assert fraction.loc[0.01, "mean"] == 0.75 and np.isnan(fraction.loc[0.1, "std"])
