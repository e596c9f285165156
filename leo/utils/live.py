"""Training logs through DVCLive, set up for a stage of a DVC pipeline, and read back.

A log directory is DVCLive's layout: ``plots/metrics/<name>.tsv`` (one file per logged
quantity, columns ``step`` and ``<name>``, one row per logged step) and ``metrics.json``
(the latest value of each quantity, ``step``, and whatever the caller adds to
``live.summary``). :func:`open_live` configures DVCLive for use inside a pipeline: the
stage's ``dvc.yaml`` entry declares those files as metrics and plots, so DVCLive writes no
``dvc.yaml`` of its own and saves no experiment (``dvc exp run`` does that), and no report.

Logged rows carry no timestamps (DVCLive's default), so the plot files are a function of the
logged values; wall times belong in ``metrics.json`` only. DVCLive appends to its files as
it goes; a run that resumes opens a fresh directory and logs its saved history again
(:func:`log_rows`), so the files then equal an uninterrupted run's.

``dvclive`` is imported when a log is opened, not with this module (it takes about a
second to import).
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from leo.utils.errors import LeoInputError

if TYPE_CHECKING:
    from dvclive import Live

METRICS_DIR = Path("plots") / "metrics"
SUMMARY_FILE = "metrics.json"


def open_live(directory: str | os.PathLike) -> Live:
    """A fresh DVCLive log in ``directory`` (its previous DVCLive files are removed).

    Inside ``dvc repro`` or ``dvc exp run`` DVCLive notices the pipeline; outside one it
    looks for the DVC repository around the working directory, as DVCLive always does.
    Use as a context manager (``with open_live(d) as live:``): leaving it writes
    ``metrics.json`` with ``live.summary``.
    """
    from dvclive import Live

    return Live(str(directory), dvcyaml=False, save_dvc_exp=False, report=None)


def log_row(live: Live | None, row: Mapping[str, float], step_key: str = "step") -> None:
    """Log one row (``{step_key: int, name: number, ...}``) at its step; None: no log."""
    if live is None:
        return
    live.step = int(row[step_key])
    for name, value in row.items():
        if name != step_key:
            live.log_metric(name, value)
    live.next_step()  # writes metrics.json; the next row sets its own step


def log_rows(live: Live | None, rows: Iterable[Mapping[str, float]], step_key: str = "step"):
    """Log ``rows`` in order (a resumed run's saved history, into a fresh log)."""
    for row in rows:
        log_row(live, row, step_key)


def read_logged(directory: str | os.PathLike, names: Sequence[str]) -> list[dict[str, float]]:
    """The rows a DVCLive log holds for ``names``, joined on ``step``, in step order.

    Args:
        directory: the log directory (``metrics.json`` and ``plots/metrics/`` inside).
        names: the quantities to read; each must have been logged.

    Returns:
        One dict per logged step: ``{"step": float, name: float, ...}``; a quantity not
        logged at a step is NaN there.

    Raises:
        LeoInputError: a missing file, a wrong header or a non-numeric value, naming the file.
    """
    columns: dict[str, dict[int, float]] = {}
    for name in names:
        path = Path(directory) / METRICS_DIR / f"{name}.tsv"
        if not path.is_file():
            raise LeoInputError(f"{path}: not found (run the stage that logs '{name}')")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t")
            if reader.fieldnames is None or not {"step", name} <= set(reader.fieldnames):
                raise LeoInputError(f"{path}: expected the columns step and {name}")
            try:
                columns[name] = {int(r["step"]): float(r[name]) for r in reader}
            except (TypeError, ValueError):
                raise LeoInputError(f"{path}: a non-numeric value") from None
    steps = sorted(set().union(*(c.keys() for c in columns.values())))
    return [{"step": float(s), **{n: columns[n].get(s, math.nan) for n in names}} for s in steps]
