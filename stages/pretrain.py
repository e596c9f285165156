"""Stage ``pretrain``: supervised pre-training of the WRN feature extractor.

Reads ``base`` (seed, dataset) and ``pretrain`` from ``params.yaml``: the common keys
``device``, ``heldout_fraction``, ``eval_batch_size`` and the preset named by
``base.dataset`` (architecture and optimisation). Reads only
``data/prepared/{manifest.json,train.npz}``; writes ``data/pretrain/backbone.pt``,
``reports/pretrain/metrics.json`` and ``reports/pretrain/history.csv``. A kill leaves
``tmp/pretrain/resume.pt`` (outside DVC's outs, which DVC clears before a run); the next
run with the same params and data continues from the last finished epoch.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from leo.atomic import write_json, write_text
from leo.backbone.pretrain import PretrainConfig, pretrain, resolve_device
from leo.errors import LeoInputError
from stages.common import PARAMS_FILE, load_params, require, stage_main

PREPARED = Path("data/prepared")
OUT = Path("data/pretrain")
REPORTS = Path("reports/pretrain")
RESUME = Path("tmp/pretrain/resume.pt")
HISTORY_COLUMNS = ("epoch", "train_loss", "train_acc", "heldout_acc", "lr")

NUMBER = (int, float)
PRESET_KEYS: dict[str, Any] = {
    "depth": int,
    "width": int,
    "strides": list,
    "dropout": NUMBER,
    "epochs": int,
    "batch_size": int,
    "lr": NUMBER,
    "momentum": NUMBER,
    "nesterov": bool,
    "weight_decay": NUMBER,
    "schedule": str,
    "milestones": list,
    "gamma": NUMBER,
    "augment": str,
    "pad": int,
    "amp": bool,
}
COMMON_KEYS: dict[str, Any] = {"heldout_fraction": NUMBER, "eval_batch_size": int}


def config_from_params(params: dict[str, Any]) -> tuple[PretrainConfig, str]:
    """``load_params("pretrain")`` -> (the dataset's PretrainConfig, device name).

    Raises:
        LeoInputError: a missing or mistyped key, named as ``pretrain.<dataset>.<key>``.
    """
    base = params["base"]
    seed = require(base, "seed", int, "base")
    dataset = require(base, "dataset", str, "base")
    preset = require(params, dataset, dict, "pretrain")
    values = {k: require(preset, k, t, f"pretrain.{dataset}") for k, t in PRESET_KEYS.items()}
    values.update({k: require(params, k, t, "pretrain") for k, t in COMMON_KEYS.items()})
    device = require(params, "device", str, "pretrain")
    try:
        return PretrainConfig(**values, seed=seed), device
    except (ValueError, TypeError) as err:
        raise LeoInputError(f"{PARAMS_FILE}: pretrain.{dataset}: {err}") from None


def history_csv(history: list[dict]) -> str:
    """The per-epoch history as CSV text with :data:`HISTORY_COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row[k] for k in HISTORY_COLUMNS})
    return buf.getvalue()


@stage_main
def main() -> None:
    """Run the stage in the current directory."""
    cfg, device = config_from_params(load_params("pretrain"))
    device = resolve_device(device, f"{PARAMS_FILE}: key 'pretrain.device'")
    metrics = pretrain(PREPARED, OUT, cfg, device, resume_path=RESUME)
    history = metrics.pop("history")
    write_text(REPORTS / "history.csv", history_csv(history))
    write_json(REPORTS / "metrics.json", metrics)
    print(
        f"pretrain: held-out accuracy {metrics['backbone_heldout_accuracy']:.4f} "
        f"(epoch {metrics['best_epoch']}/{metrics['epochs']}), {metrics['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
