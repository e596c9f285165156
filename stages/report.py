"""Stage ``report``: one metrics file for ``dvc metrics diff`` and PNG training curves.

Usage: ``python -m stages.report [--source-metrics FILE]``. Reads ``report`` (``dpi``) and
the run names of ``metatrain.runs`` from ``params.yaml``; the source metrics ``FILE``
(default ``reports/pretrain/metrics.json``: the backbone's held-out accuracy; or an
``import_published`` summary); per run the DVCLive log ``reports/metatrain/RUN/``
(``metrics.json``, ``plots/metrics/*.tsv``) and ``reports/evaluate/RUN/metrics.json``.
Writes ``reports/metrics.json`` (see :mod:`leo.report`) and
``reports/plots/{loss,accuracy,step_sizes}.png``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from leo.report import aggregate, plot_histories, read_history, read_json, summary_markdown
from leo.settings import Settings
from leo.utils.atomic import atomic_dir, write_json
from stages.common import REPORTS, settings, stage_main


def run(params: Settings, source_metrics: Path) -> dict[str, Any]:
    """Aggregate the stages' reports for every run; write the metrics and the plots."""
    runs = list(params.metatrain.runs)
    per_run = {
        r: (
            read_json(REPORTS / "metatrain" / r / "metrics.json"),
            read_json(REPORTS / "evaluate" / r / "metrics.json"),
        )
        for r in runs
    }
    histories = {r: read_history(REPORTS / "metatrain" / r) for r in runs}
    report = aggregate(read_json(source_metrics), per_run, source_path=str(source_metrics))
    if "backbone" in report:
        dataset = params.base.dataset
    else:
        source = report.get("published") or report["embeddings"]
        dataset = source.get("dataset", "your embeddings")
    with atomic_dir(REPORTS / "plots") as tmp:
        plot_histories(histories, tmp, dpi=params.report.dpi, title=f"LEO on {dataset}")
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
    report = run(settings(), Path(args.source_metrics))
    print(summary_markdown(report), end="")


if __name__ == "__main__":
    main()
