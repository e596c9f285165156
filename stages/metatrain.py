"""Stage ``metatrain@<run>``: LEO meta-training of one shot configuration on stored embeddings.

Usage: ``python -m stages.metatrain RUN [--embeddings DIR]``. Reads ``base`` (seed) and
``metatrain`` from ``params.yaml``: ``device`` (auto | cpu | cuda), ``common`` (fields of
:class:`leo.core.config.LEOConfig` for every run) and ``runs.RUN`` (an optional ``preset`` of
:data:`leo.core.config.PRESETS` plus fields overriding ``common``). The config is
``make_config(preset, seed=base.seed, **common, **runs[RUN])``; with ``from_tune: true`` in
``runs.RUN``, the hyperparameters of ``data/tune/RUN/best.yaml`` (``tune@RUN``'s search) go on
top.

Reads ``DIR/train.parquet`` and ``DIR/val.parquet`` (never ``test``); writes
``data/metatrain/RUN/best.pt`` (the best-on-validation parameters) and the DVCLive log
``reports/metatrain/RUN/`` (:mod:`leo.utils.live`): ``plots/metrics/<column>.tsv``, one row
per validation, and ``metrics.json``, the last row plus the run's summary. A kill
leaves ``tmp/metatrain/RUN/`` (outside DVC's outs, which DVC clears before a run); the next
run with the same config and embeddings continues from its last validation, a run with
another config or other embeddings starts afresh.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

from leo.data.store import check_disjoint_classes, read_embeddings
from leo.meta.train import meta_train
from leo.settings import Settings
from leo.tune.outputs import read_best
from leo.tune.space import apply
from leo.utils.atomic import atomic_dir
from leo.utils.device import resolve_device
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256
from leo.utils.live import open_live
from stages.common import (
    METATRAIN,
    REPORTS,
    parse_run_args,
    prepare_work_dir,
    settings,
    stage_main,
    where,
)

WORK = Path("tmp/metatrain")
TUNE = Path("data/tune")  # tune@<run>'s best.yaml: applied when metatrain.runs.<run>.from_tune


def run(run_name: str, params: Settings, embeddings: Path) -> dict[str, Any]:
    """Meta-train ``run_name`` on ``embeddings``; write the outs; return the metrics written."""
    params.require_run(run_name)
    cfg, preset = params.run_configs[run_name]
    if params.from_tune(run_name):  # tune@<run>'s hyperparameters on top of the run's config
        tuned = TUNE / run_name / "best.yaml"
        cfg = apply(cfg, read_best(tuned), str(tuned))
    device = resolve_device(params.metatrain.device, f"{where()}: metatrain.device")
    paths = {s: embeddings / f"{s}.parquet" for s in ("train", "val")}
    check_disjoint_classes(list(paths.values()))
    train, val = (read_embeddings(p) for p in paths.values())
    if train.dim != val.dim:
        raise LeoInputError(f"{embeddings}: train is {train.dim}-d but val is {val.dim}-d")
    work = WORK / run_name
    fingerprint = {
        "config": cfg.to_dict(),
        "device": device.type,
        **{f"{s}_sha256": file_sha256(p) for s, p in paths.items()},
    }
    resuming = prepare_work_dir(work, fingerprint)
    print(
        f"metatrain {run_name}: {cfg.num_classes}-way {cfg.num_shots}-shot, preset {preset}"
        f"{' with tune@' + run_name + ' hyperparameters' if params.from_tune(run_name) else ''}, "
        f"{cfg.num_steps} steps (validation every {cfg.validate_every}), {train.dim}-d "
        f"{embeddings}, {device.type}{', resuming' if resuming else ''}",
        flush=True,
    )
    live = open_live(REPORTS / "metatrain" / run_name)  # a fresh log; a resumed run refills it
    result = meta_train(
        cfg,
        train,
        val,
        work,
        device=device,
        progress=sys.stderr.isatty(),
        live=live,
        cpu_threads=None,  # the stage set base.cpu_threads already
    )
    with atomic_dir(METATRAIN / run_name) as tmp:
        shutil.copy2(result.checkpoint, tmp / "best.pt")
    metrics = {
        "num_shots": cfg.num_shots,
        "best_val_accuracy": result.best_val_accuracy,
        "best_step": result.best_step,
        "steps": result.steps,
        "wall_seconds": result.wall_seconds,
        "device": device.type,
        "embedding_dim": train.dim,
        "train_classes": train.num_classes,
        "val_classes": val.num_classes,
        "preset": preset,
        "from_tune": params.from_tune(run_name),
    }
    live.summary.update(metrics)
    live.end()  # metrics.json (the config's values are params: dvc exp show lists them)
    shutil.rmtree(work)
    for row in result.history:
        print(
            f"  step {int(row['step'])}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.4f}, val acc {row['val_accuracy']:.4f}",
            flush=True,
        )
    return metrics


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    args = parse_run_args("metatrain", __doc__, "{train,val}.parquet")
    metrics = run(args.run, settings(), Path(args.embeddings))
    print(
        f"metatrain {args.run}: best meta-validation accuracy {metrics['best_val_accuracy']:.4f} "
        f"at step {metrics['best_step']}/{metrics['steps']}, {metrics['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
