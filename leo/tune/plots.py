"""Figures of a search: fitness over outer steps, and each hyperparameter's schedule.

Drawn headless (matplotlib's Agg backend), one PNG each, a colour per trial:

- ``fitness.png``: every trial's meta-validation accuracy at each interval; after an
  exploit the trial's line starts again from the source's point (a hollow circle), whose
  state it continues from;
- ``<hyperparameter>.png``: the value each trial trained with over outer steps (a step
  function: the value of the segment ending at each validation), log-scaled for log ranges;
  an exploit shows as the jump to the source's (perturbed) value.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leo.tune.lineage import Summary, segments  # noqa: E402
from leo.tune.space import Dimension  # noqa: E402
from leo.utils.atomic import atomic_path  # noqa: E402


def _save(fig, path: Path, dpi: int) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    return path


def _colors(trials: list[str]) -> dict[str, Any]:
    cmap = plt.get_cmap("tab10" if len(trials) <= 10 else "tab20")
    return {t: cmap(i % cmap.N) for i, t in enumerate(trials)}


def _widths(trials: list[str]) -> dict[str, float]:
    """Line widths from thick (first trial) to thin (last), the thin drawn on top, so that
    trials with equal values stay visible."""
    n = max(len(trials) - 1, 1)
    return {t: 4.0 - 2.8 * i / n for i, t in enumerate(trials)}


def _legend(ax, n: int) -> None:
    ax.legend(title="trial", fontsize="small", ncol=max(1, (n + 9) // 10), loc="best")


def plot_fitness(summary: Summary, path: Path, *, title: str, dpi: int = 120) -> Path:
    """``fitness.png``: meta-validation accuracy per trial over outer steps, cut at exploits."""
    colors, widths = _colors(list(summary.histories)), _widths(list(summary.histories))
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for trial in summary.histories:
        color = colors[trial]
        for i, (start, rows) in enumerate(segments(summary, trial)):
            steps = [r["step"] for r in rows]
            acc = [100 * r["val_accuracy"] for r in rows]
            if start is not None:
                steps, acc = [start["step"], *steps], [100 * start["val_accuracy"], *acc]
                ax.plot(steps[0], acc[0], marker="o", ms=9, mfc="none", mec=color, ls="")
            ax.plot(
                steps,
                acc,
                marker="o",
                ms=4,
                lw=widths[trial],
                color=color,
                label=trial if i == 0 else None,
            )
    best = summary.best
    ax.plot(best["step"], 100 * best["val_accuracy"], marker="*", ms=14, color="black", ls="")
    ax.set(
        xlabel="outer step",
        ylabel="meta-validation accuracy (%)",
        title=f"{title}: fitness per trial (a line from a hollow circle: an exploit, the trial "
        "continuing from that trial's state; *: best)",
    )
    ax.title.set_fontsize("small")
    ax.grid(alpha=0.3)
    _legend(ax, len(summary.histories))
    return _save(fig, path, dpi)


def plot_schedule(
    summary: Summary, dim: Dimension, path: Path, *, title: str, dpi: int = 120
) -> Path:
    """``<name>.png``: the hyperparameter ``dim`` each trial trained with, over outer steps."""
    trials = list(summary.histories)
    colors, widths = _colors(trials), _widths(trials)
    offset = {t: 0.0 for t in trials}
    if dim.choices is not None and len(dim.choices) > 1:  # spread equal choices apart a little
        gap = min(b - a for a, b in itertools.pairwise(sorted(dim.choices)))
        offset = {t: gap * 0.3 * (i / max(len(trials) - 1, 1) - 0.5) for i, t in enumerate(trials)}
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    for trial in trials:
        for i, (start, rows) in enumerate(segments(summary, trial)):
            values = [r["hyperparameters"][dim.name] + offset[trial] for r in rows]
            steps = [0 if start is None else start["step"]] + [r["step"] for r in rows]
            ax.plot(
                steps,
                [values[0], *values],
                drawstyle="steps-pre",
                lw=widths[trial],
                color=colors[trial],
                label=trial if i == 0 else None,
            )
    if dim.choices is None:
        ax.axhline(dim.low, color="grey", ls="--", lw=0.8)
        ax.axhline(dim.high, color="grey", ls="--", lw=0.8)
        if dim.log:
            ax.set_yscale("log")
    else:
        ax.set_yticks(list(dim.choices))
    best = summary.best
    ax.plot(best["step"], best["hyperparameters"][dim.name], marker="*", ms=14, color="black")
    ax.set(
        xlabel="outer step",
        ylabel=dim.name if dim.choices is None else f"{dim.name} (trials drawn a little apart)",
        title=f"{title}: {dim.name} per trial, search space {dim.describe()} (*: best)",
    )
    ax.title.set_fontsize("medium")
    ax.grid(alpha=0.3, which="both")
    _legend(ax, len(summary.histories))
    return _save(fig, path, dpi)


def plot_search(
    summary: Summary, space: dict[str, Dimension], out_dir: Path, *, title: str, dpi: int = 120
) -> list[Path]:
    """Every figure of a search into ``out_dir``; returns the PNG paths."""
    out_dir = Path(out_dir)
    paths = [plot_fitness(summary, out_dir / "fitness.png", title=title, dpi=dpi)]
    for dim in space.values():
        paths.append(plot_schedule(summary, dim, out_dir / f"{dim.name}.png", title=title, dpi=dpi))
    return paths
