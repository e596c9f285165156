"""The pipeline's report: one metrics file for ``dvc metrics diff`` and PNG training curves.

Inputs are the files the stages leave under ``reports/``: the source metrics (the pretrain
stage's ``backbone_heldout_accuracy`` ..., or an ``import_published`` summary), and per
meta-training run its DVCLive log ``reports/metatrain/<run>/`` (``metrics.json`` and one
``plots/metrics/<name>.tsv`` per history column, :mod:`leo.utils.live`) and
``reports/evaluate/<run>/metrics.json``. :func:`aggregate` turns them into one JSON object:

.. code-block:: text

    {"backbone": {"heldout_accuracy", "wall_seconds"}   # or "published" / "embeddings"
     "<run>": {"num_shots", "best_val_accuracy", "best_step", "steps", "test_accuracy",
               "test_ci95", "test_episodes", "metatrain_seconds", "evaluate_seconds"},
     "wall_seconds": the timed stages' wall times summed (source, meta-training, evaluation)}

Plots are drawn headless (matplotlib's Agg backend), one PNG per quantity, a line per run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from leo.utils.atomic import atomic_path  # noqa: E402
from leo.utils.errors import LeoInputError  # noqa: E402
from leo.utils.live import read_logged  # noqa: E402

PLOTS = ("loss.png", "accuracy.png", "step_sizes.png")
HISTORY_COLUMNS = (  # what the metatrain stage logs per validation (besides the step)
    "train_loss",
    "train_accuracy",
    "val_accuracy",
    "val_ci95",
    "nonfinite_steps",
    "inner_lr_mean",
    "finetune_lr_mean",
)


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from ``path``; a missing or malformed file is a LeoInputError."""
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: not found (run the stage that writes it)")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LeoInputError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(obj, dict):
        raise LeoInputError(f"{path}: expected a JSON object")
    return obj


def read_history(live_dir: str | Path) -> list[dict[str, float]]:
    """A meta-training run's history from its DVCLive log directory, one row per validation.

    Returns:
        ``[{"step", *HISTORY_COLUMNS}]`` as floats, in step order.

    Raises:
        LeoInputError: a column's file is missing or malformed, naming it.
    """
    return read_logged(live_dir, HISTORY_COLUMNS)


def _number(obj: Mapping[str, Any], key: str, where: str) -> float:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise LeoInputError(f"{where}: missing or non-numeric '{key}'")
    return value


SOURCE_KEYS = ("dataset", "view", "feature_dim", "train_rows", "val_rows", "test_rows")


def source_summary(source: Mapping[str, Any], where: str) -> tuple[str, dict[str, Any]]:
    """(name, metrics) of the embeddings' source.

    Three kinds: the pipeline's backbone (``backbone_heldout_accuracy``, ``wall_seconds``);
    the published features (``{"source": "published", ...}`` from ``import_published``); or
    embeddings a user made (``{"source": "<what made them>", "dataset"?, "feature_dim"?,
    "<split>_rows"?, "wall_seconds"?}``, see ``docs/own-embeddings.md``).
    """
    if "backbone_heldout_accuracy" in source:
        return "backbone", {
            "heldout_accuracy": _number(source, "backbone_heldout_accuracy", where),
            "wall_seconds": _number(source, "wall_seconds", where),
        }
    if source.get("source") == "published":
        return "published", {k: source[k] for k in SOURCE_KEYS if k in source} | {
            "wall_seconds": _number(source, "wall_seconds", where)
        }
    if isinstance(source.get("source"), str) and source["source"]:
        seconds = _number(source, "wall_seconds", where) if "wall_seconds" in source else 0.0
        return "embeddings", {"source": source["source"]} | {
            k: source[k] for k in SOURCE_KEYS if k in source
        } | {"wall_seconds": seconds}
    raise LeoInputError(
        f"{where}: neither backbone metrics, a published-import summary, nor a "
        '{"source": ...} description of your own embeddings'
    )


def run_summary(metatrain: Mapping[str, Any], evaluation: Mapping[str, Any], run: str) -> dict:
    """One run's row of the report from its metatrain and evaluate metrics."""
    mt, ev = f"reports/metatrain/{run}/metrics.json", f"reports/evaluate/{run}/metrics.json"
    return {
        "num_shots": int(_number(metatrain, "num_shots", mt)),
        "best_val_accuracy": _number(metatrain, "best_val_accuracy", mt),
        "best_step": int(_number(metatrain, "best_step", mt)),
        "steps": int(_number(metatrain, "steps", mt)),
        "test_accuracy": _number(evaluation, "accuracy", ev),
        "test_ci95": _number(evaluation, "ci95", ev),
        "test_episodes": int(_number(evaluation, "episodes", ev)),
        "metatrain_seconds": _number(metatrain, "wall_seconds", mt),
        "evaluate_seconds": _number(evaluation, "seconds", ev),
    }


def aggregate(
    source: Mapping[str, Any],
    runs: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Any]]],
    *,
    source_path: str = "source metrics",
) -> dict[str, Any]:
    """The report's metrics: the source's summary, one entry per run, the total wall time.

    Args:
        source: the source metrics (pretrain stage or published import).
        runs: ``{run: (metatrain metrics, evaluate metrics)}``, in report order.
        source_path: how to name ``source`` in errors.
    """
    name, summary = source_summary(source, source_path)
    report: dict[str, Any] = {name: summary}
    total = summary["wall_seconds"]
    for run, (metatrain, evaluation) in runs.items():
        if run in report or run == "wall_seconds":
            raise LeoInputError(f"run name {run!r} clashes with a report key")
        report[run] = run_summary(metatrain, evaluation, run)
        total += report[run]["metatrain_seconds"] + report[run]["evaluate_seconds"]
    report["wall_seconds"] = total
    return report


def summary_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One table row per run (for people: percentages, rounded)."""
    rows = []
    for run, value in report.items():
        if isinstance(value, dict) and "test_accuracy" in value:
            rows.append(
                {
                    "run": run,
                    "shots": value["num_shots"],
                    "meta-test accuracy (%)": round(100 * value["test_accuracy"], 2),
                    "95% CI (+-%)": round(100 * value["test_ci95"], 2),
                    "best meta-val accuracy (%)": round(100 * value["best_val_accuracy"], 2),
                    "best step": value["best_step"],
                    "train + eval (s)": round(
                        value["metatrain_seconds"] + value["evaluate_seconds"], 1
                    ),
                }
            )
    return rows


def summary_markdown(report: Mapping[str, Any]) -> str:
    """The report as a short Markdown document (a table of runs and the source line)."""
    rows = summary_rows(report)
    lines = ["# LEO pipeline metrics", ""]
    if "backbone" in report:
        b = report["backbone"]
        lines.append(
            f"Backbone held-out accuracy: **{100 * b['heldout_accuracy']:.2f}%** "
            f"(pre-training {b['wall_seconds']:.0f} s)."
        )
    elif "published" in report:
        p = report["published"]
        lines.append(
            f"Published embeddings: {p.get('dataset', '?')} / {p.get('view', '?')} "
            f"({p.get('feature_dim', '?')}-d)."
        )
    elif "embeddings" in report:
        e = report["embeddings"]
        lines.append(
            f"Own embeddings: {e['source']} ({e.get('dataset', '?')}, "
            f"{e.get('feature_dim', '?')}-d)."
        )
    total = report.get("wall_seconds", float("nan"))
    lines += ["", f"Wall time of the timed stages (source, meta-train, evaluate): {total:.0f} s."]
    lines.append("")
    if rows:
        header = list(rows[0])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _save(fig, path: Path, dpi: int) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def _with(rows: list[dict[str, float]], key: str) -> list[dict[str, float]]:
    """The rows where ``key`` is finite, in order (the rows :func:`_finite` draws)."""
    return [r for r in rows if math.isfinite(r.get(key, math.nan))]


def _finite(rows: list[dict[str, float]], key: str) -> tuple[list[float], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if math.isfinite(r.get(key, math.nan))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_histories(
    histories: Mapping[str, list[dict[str, float]]],
    out_dir: str | Path,
    *,
    dpi: int = 120,
    title: str = "LEO",
) -> list[Path]:
    """Draw the training curves of every run into ``out_dir``; returns the PNG paths.

    - ``loss.png``: meta-training loss (averaged between validations over the steps with a
      finite loss) against outer step, on a log scale; a cross marks an interval with
      non-finite steps (``nonfinite_steps``);
    - ``accuracy.png``: meta-training accuracy (dashed) and meta-validation accuracy (solid,
      with its 95% CI band) against outer step;
    - ``step_sizes.png``: the learned step sizes, mean of alpha (latent inner loop) and of
      the fine-tuning step sizes, against outer step.
    """
    out_dir = Path(out_dir)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    style = {run: colors[i % len(colors)] for i, run in enumerate(histories)}

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    flagged = False
    for run, rows in histories.items():
        steps, loss = _finite(rows, "train_loss")
        ax.plot(steps, loss, marker="o", ms=3, color=style[run], label=run)
        bad = [
            (s, v)
            for s, v, r in zip(steps, loss, _with(rows, "train_loss"), strict=True)
            if r.get("nonfinite_steps", 0) > 0
        ]
        if bad:
            flagged = True
            ax.scatter(*zip(*bad, strict=True), s=70, marker="x", color=style[run], zorder=3)
    if flagged:  # a label once, in black: the crosses take their run's colour
        ax.scatter([], [], s=70, marker="x", color="k", label="interval with non-finite steps")
    if any(v > 0 for _, rows in histories.items() for v in _finite(rows, "train_loss")[1]):
        ax.set_yscale("log")  # a rare huge loss (a sampled classifier) would flatten the rest
    ax.set(
        xlabel="outer step",
        ylabel="meta-training loss (mean of the finite steps)",
        title=f"{title}: meta-training loss",
    )
    ax.grid(alpha=0.3)
    ax.legend(title="run")
    _save(fig, out_dir / "loss.png", dpi)

    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for run, rows in histories.items():
        c = style[run]
        steps, val = _finite(rows, "val_accuracy")
        ax.plot(*_finite(rows, "train_accuracy"), ls="--", color=c, label=f"{run} meta-train")
        ax.plot(steps, val, marker="o", ms=3, color=c, label=f"{run} meta-validation")
        ci = [r.get("val_ci95", math.nan) for r in rows if math.isfinite(r["val_accuracy"])]
        if len(ci) == len(val) and all(math.isfinite(x) for x in ci):
            lo = [v - e for v, e in zip(val, ci, strict=True)]
            hi = [v + e for v, e in zip(val, ci, strict=True)]
            ax.fill_between(steps, lo, hi, color=c, alpha=0.15, lw=0)
    ax.set(xlabel="outer step", ylabel="accuracy", title=f"{title}: accuracy (5-way episodes)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, out_dir / "accuracy.png", dpi)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4), layout="constrained")
    for run, rows in histories.items():
        ax1.plot(*_finite(rows, "inner_lr_mean"), marker="o", ms=3, color=style[run], label=run)
        ax2.plot(*_finite(rows, "finetune_lr_mean"), marker="o", ms=3, color=style[run], label=run)
    ax1.set(xlabel="outer step", ylabel="mean alpha", title="latent inner-loop step size")
    ax2.set(xlabel="outer step", ylabel="mean step size", title="fine-tuning step size")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(title="run")
    fig.suptitle(f"{title}: learned step sizes")
    _save(fig, out_dir / "step_sizes.png", dpi)
    return [out_dir / name for name in PLOTS]
