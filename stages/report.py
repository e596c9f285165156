"""Stage ``report``: one metrics file for ``dvc metrics diff`` and PNG training curves.

Usage: ``python -m stages.report [--source-metrics FILE]``. Reads ``report`` (``dpi``) and
the run names of ``metatrain.runs`` from ``params.yaml``; the source metrics ``FILE``
(default ``reports/pretrain/metrics.json``: the backbone's held-out accuracy; or an
``import_published`` summary); per run ``reports/metatrain/RUN/{metrics.json,history.csv}``
and ``reports/evaluate/RUN/metrics.json``. Writes ``reports/metrics.json`` (see
:mod:`leo.report`) and ``reports/plots/{loss,accuracy,step_sizes}.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leo.atomic import atomic_dir, write_json
from leo.errors import LeoInputError
from leo.report import aggregate, plot_histories, read_history, read_json, summary_markdown
from stages.common import PARAMS_FILE, load_params, require, stage_main

REPORTS = Path("reports")
KEYS = {"base", "dpi"}


def run(params: dict[str, Any], runs: list[str], source_metrics: Path) -> dict[str, Any]:
    """Aggregate the stages' reports for ``runs``; write the metrics and the plots."""
    unknown = sorted(set(params) - KEYS)
    if unknown:
        raise LeoInputError(f"{PARAMS_FILE}: unknown key 'report.{unknown[0]}'")
    dpi = require(params, "dpi", int, "report")
    if not 30 <= dpi <= 600:
        raise LeoInputError(f"{PARAMS_FILE}: key 'report.dpi' must be in [30, 600], got {dpi}")
    if not runs:
        raise LeoInputError(f"{PARAMS_FILE}: key 'metatrain.runs' names no run")
    per_run = {
        r: (
            read_json(REPORTS / "metatrain" / r / "metrics.json"),
            read_json(REPORTS / "evaluate" / r / "metrics.json"),
        )
        for r in runs
    }
    histories = {r: read_history(REPORTS / "metatrain" / r / "history.csv") for r in runs}
    report = aggregate(read_json(source_metrics), per_run, source_path=str(source_metrics))
    if "backbone" in report:
        dataset = require(params["base"], "dataset", str, "base")
    else:
        dataset = report["published"].get("dataset", "published embeddings")
    with atomic_dir(REPORTS / "plots") as tmp:
        plot_histories(histories, tmp, dpi=dpi, title=f"LEO on {dataset}")
    write_json(REPORTS / "metrics.json", report)
    return report


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__)
    parser.add_argument(
        "--source-metrics",
        default="reports/pretrain/metrics.json",
        help="metrics of the stage that made the embeddings (default: the pretrain stage's)",
    )
    args = parser.parse_args()
    runs = require(load_params("metatrain"), "runs", dict, "metatrain")
    report = run(load_params("report"), [str(r) for r in runs], Path(args.source_metrics))
    print(summary_markdown(report), end="")


if __name__ == "__main__":
    main()
