"""Markdown of the comparison's tables: ``table.md`` and ``ensembles.md``.

Both read the dicts :func:`leo.comparison.compare.compare` writes as ``table.json`` and
``ensembles.json``; numbers appear in percent with two decimals, "-" where undefined.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leo.comparison.ensemble import MEAN_ONLY


def _pct(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}" if np.isfinite(x) else "-"


def table_markdown(table: dict[str, Any]) -> str:
    """``table.md``: one row per method, accuracy and paired difference to LEO in points."""
    lines = [
        f"# {table['num_classes']}-way {table['num_shots']}-shot comparison (run `{table['run']}`)",
        "",
        f"{table['episodes']} test episodes (seed {table['seed']}), the same for every method "
        f"(indices sha256 `{table['episodes_sha256'][:16]}`). Accuracy in %, 95% CI half-width; "
        "difference = method - LEO in points, paired per episode.",
        "",
        "| method | accuracy (%) | ± 95% CI | Δ vs LEO | ± 95% CI | significant | steps "
        "(best) | what it is |",
        "|---|---:|---:|---:|---:|:---:|---:|---|",
    ]
    for name, row in table["methods"].items():
        is_ref = name == table["reference"]
        steps = "-" if row["num_steps"] is None else f"{row['num_steps']} ({row['best_step']})"
        lines.append(
            f"| {name} | {_pct(row['accuracy'])} | {_pct(row['ci95'])} | "
            f"{'—' if is_ref else _signed(row['difference'])} | "
            f"{'—' if is_ref else _pct(row['difference_ci95'])} | "
            f"{'—' if is_ref else ('yes' if row['significant'] else 'no')} | {steps} | "
            f"{row['summary']} |"
        )
    return "\n".join(lines) + "\n"


def ensembles_markdown(table: dict[str, Any]) -> str:
    """``ensembles.md``: accuracy, ECE and the paired difference to mean-only LEO."""
    lines = [
        f"# Test-time latent ensembles (run `{table['run']}`)",
        "",
        f"{table['episodes']} test episodes (seed {table['seed']}; sample noise seed "
        f"{table['noise_seed']}). Ensembles average the class probabilities of S sampled "
        "classifiers; ECE over 15 bins. Difference = predictor - mean-only in points, paired. "
        "A sampled classifier whose adaptation diverged (non-finite weights) is left out of "
        "its episode's average (none left: uniform probabilities).",
        "",
        "| predictor | accuracy (%) | ± 95% CI | ECE (%) | Δ vs mean-only | ± 95% CI | "
        "diverged classifiers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in table["predictors"].items():
        ref = name == MEAN_ONLY
        lines.append(
            f"| {name} | {_pct(row['accuracy'])} | {_pct(row['ci95'])} | {_pct(row['ece'])} | "
            f"{'—' if ref else _signed(row['difference'])} | "
            f"{'—' if ref else _pct(row['difference_ci95'])} | "
            f"{row.get('diverged', 0)} of {row.get('classifiers', 0)} |"
        )
    return "\n".join(lines) + "\n"
