"""The files of ``tune@<run>``: the tuned hyperparameters, fitness curves, lineage, figures.

``data_dir`` (``data/tune/<run>/``, what ``metatrain`` and ``compare`` read):

- ``best.yaml``: the best trial's hyperparameters at the last step, a mapping of LEOConfig
  fields, ready to go under ``metatrain.runs.<run>`` (:func:`read_best` reads it back).

A run of ``metatrain.runs`` without a search gets an empty ``best.yaml`` and a
``metrics.json`` saying so (:func:`write_no_search`).

``reports_dir`` (``reports/tune/<run>/``):

- ``best.yaml``: the same file;
- ``metrics.json``: the search's summary (DVC metrics): population, steps, the best trial
  and its fitness, every trial's first and last fitness, exploits, nodes, wall time;
- ``lineage.json``: ``{"initial": {trial: hyperparameters}, "events": [{"trial", "step",
  "source", "changed"}], "final": {trial: hyperparameters}, "best": {...}}``;
- ``history.tsv``: one row per trial and validation, in reporting order: the loop's history
  columns, the ``source`` trial and ``source_step`` of the state an exploit continued from
  (empty otherwise), and the hyperparameters the interval ending there trained with;
- ``fitness/<trial>.tsv``: columns ``step`` and ``val_accuracy`` (DVC plots, one line per
  trial);
- ``figures/``: ``fitness.png`` and one ``<hyperparameter>.png`` per searched dimension
  (:mod:`leo.tune.plots`).

Both folders are written whole to temporary siblings and renamed into place. Apart from
``metrics.json`` (wall time, the Ray nodes) every file is a function of the search's
results, so equal searches give equal files.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from ruamel.yaml import YAML, YAMLError

from leo.tune.lineage import ROW_FIELDS
from leo.tune.space import TUNABLE
from leo.utils.atomic import atomic_dir, write_json, write_text
from leo.utils.errors import LeoInputError

if TYPE_CHECKING:
    from leo.tune.search import SearchResult, SearchSettings

BEST_FILE = "best.yaml"


def best_yaml(result: SearchResult, settings: SearchSettings) -> str:
    """``best.yaml``'s text: a comment saying where it comes from, then the values."""
    best = result.summary.best
    lines = [
        f"# tune@{settings.name}: trial {best['trial']} of {settings.population}, the best "
        f"meta-validation accuracy at outer step {best['step']}",
        f"# ({best['val_accuracy']:.4f} +- {best['val_ci95']:.4f}). The values of "
        f"metatrain.runs.{settings.name}; `from_tune: true` there applies them.",
    ]
    values = {k: best["hyperparameters"][k] for k in settings.space}
    # PyYAML writes floats as YAML 1.1 and 1.2 both read them (1.0e-09, not 1e-09)
    return "\n".join(lines) + "\n" + yaml.safe_dump(values, sort_keys=False)


def read_best(path: str | Path) -> dict[str, Any]:
    """The hyperparameters of a ``best.yaml`` (empty for a run that was not searched).

    Raises:
        LeoInputError: missing, not YAML, or not a mapping of searchable LEOConfig fields.
    """
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: no tuned hyperparameters (run the tune stage first)")
    try:
        values = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError:
        raise LeoInputError(f"{path}: not valid YAML") from None
    if not isinstance(values, dict):
        raise LeoInputError(f"{path}: expected a mapping of hyperparameters")
    for name in values:
        if name not in TUNABLE:
            raise LeoInputError(f"{path}: {name}: not a tunable hyperparameter")
    return values


def _history_tsv(result: SearchResult, names: list[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(["trial", *ROW_FIELDS, "source", "source_step", *names])
    for trial, rows in result.summary.histories.items():
        for row in rows:
            hp = row["hyperparameters"]
            copied = [row["source"] or "", "" if row["source_step"] is None else row["source_step"]]
            writer.writerow(
                [trial, *(row.get(k) for k in ROW_FIELDS), *copied, *(hp[k] for k in names)]
            )
    return buf.getvalue()


def search_metrics(result: SearchResult, settings: SearchSettings) -> dict[str, Any]:
    """``metrics.json``: the search's summary."""
    summary = result.summary
    first = {t: rows[0]["val_accuracy"] for t, rows in summary.histories.items()}
    last = {t: rows[-1]["val_accuracy"] for t, rows in summary.histories.items()}
    return {
        "run": settings.name,
        "population": settings.population,
        "steps": settings.steps,
        "perturbation_interval": settings.perturbation_interval,
        "best_trial": summary.best["trial"],
        "best_val_accuracy": summary.best["val_accuracy"],
        "best_val_ci95": summary.best["val_ci95"],
        "first_interval_val_accuracy": first,
        "final_val_accuracy": last,
        "worst_first_interval_val_accuracy": min(first.values()),
        "exploits": len(summary.lineage),
        "nodes": result.nodes,
        "resources": result.resources,
        "wall_seconds": result.wall_seconds,
    }


def write_outputs(
    result: SearchResult,
    settings: SearchSettings,
    data_dir: str | Path,
    reports_dir: str | Path,
    *,
    dpi: int = 120,
) -> dict[str, Any]:
    """Write ``data_dir`` and ``reports_dir`` (see the module docstring); return the metrics."""
    from leo.tune.plots import plot_search  # matplotlib: only when there is something to draw

    summary = result.summary
    names = list(settings.space)
    best_text = best_yaml(result, settings)
    metrics = search_metrics(result, settings)
    lineage = {
        "initial": summary.initial,
        "events": summary.lineage,
        "final": {t: rows[-1]["hyperparameters"] for t, rows in summary.histories.items()},
        "best": summary.best,
    }
    with atomic_dir(data_dir) as data, atomic_dir(reports_dir) as reports:
        write_text(data / BEST_FILE, best_text)
        write_text(reports / BEST_FILE, best_text)
        write_json(reports / "metrics.json", metrics)
        write_json(reports / "lineage.json", lineage)
        write_text(reports / "history.tsv", _history_tsv(result, names))
        for trial, rows in summary.histories.items():
            lines = ["step\tval_accuracy"] + [f"{r['step']}\t{r['val_accuracy']!r}" for r in rows]
            write_text(reports / "fitness" / f"{trial}.tsv", "\n".join(lines) + "\n")
        plot_search(
            summary, settings.space, reports / "figures", title=f"tune@{settings.name}", dpi=dpi
        )
    return metrics


def write_no_search(run: str, data_dir: str | Path, reports_dir: str | Path) -> dict[str, Any]:
    """The outputs of a run without a search: an empty ``best.yaml`` and ``metrics.json``."""
    text = f"# tune@{run}: no search (tune.runs has no entry {run}); nothing to apply.\n{{}}\n"
    metrics = {"run": run, "searched": False}
    with atomic_dir(data_dir) as data, atomic_dir(reports_dir) as reports:
        write_text(data / BEST_FILE, text)
        write_text(reports / BEST_FILE, text)
        write_json(reports / "metrics.json", metrics)
    return metrics
