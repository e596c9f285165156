"""Stage ``metatrain@<run>``: LEO meta-training of one shot configuration on stored embeddings.

Usage: ``python -m stages.metatrain RUN [--embeddings DIR]``. Reads ``base`` (seed) and
``metatrain`` from ``params.yaml``: ``device`` (auto | cpu | cuda), ``common`` (fields of
:class:`leo.config.LEOConfig` for every run) and ``runs.RUN`` (an optional ``preset`` of
:data:`leo.config.PRESETS` plus fields overriding ``common``). The config is
``make_config(preset, seed=base.seed, **common, **runs[RUN])``.

Reads ``DIR/train.parquet`` and ``DIR/val.parquet`` (never ``test``); writes
``data/metatrain/RUN/best.pt`` (the best-on-validation parameters),
``reports/metatrain/RUN/metrics.json`` and ``reports/metatrain/RUN/history.csv``. A kill
leaves ``tmp/metatrain/RUN/`` (outside DVC's outs, which DVC clears before a run); the next
run with the same config and embeddings continues from its last validation, a run with
another config or other embeddings starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from leo.atomic import atomic_dir, write_json, write_text
from leo.config import PRESETS, LEOConfig, make_config
from leo.errors import LeoInputError
from leo.store import read_embeddings
from leo.train import default_device, meta_train
from stages.common import PARAMS_FILE, load_params, parse_run_args, require, stage_main

OUT = Path("data/metatrain")
REPORTS = Path("reports/metatrain")
WORK = Path("tmp/metatrain")
KEYS = {"base", "device", "common", "runs"}
TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": ()}


def resolve_device(name: str, key: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; ``cpu``/``cuda`` as asked (``key`` names it)."""
    if name == "auto":
        return default_device()
    if name not in ("cpu", "cuda"):
        raise LeoInputError(f"{PARAMS_FILE}: key '{key}' must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise LeoInputError(f"{PARAMS_FILE}: key '{key}' asks for cuda but CUDA is not available")
    return torch.device(name)


def check_fields(values: Any, key: str) -> dict[str, Any]:
    """Check a mapping of LEOConfig fields by name and type; errors name ``key.<field>``."""
    if not isinstance(values, dict):
        raise LeoInputError(f"{PARAMS_FILE}: key '{key}' must be a mapping, got {values!r}")
    fields = {f.name: f.type for f in dataclasses.fields(LEOConfig)}
    for name, value in values.items():
        if name not in fields:
            raise LeoInputError(f"{PARAMS_FILE}: unknown key '{key}.{name}' (not a LEO field)")
        options = str(fields[name]).replace(" ", "").split("|")
        if value is None and "None" in options:
            continue
        kinds = tuple(t for o in options for t in TYPES[o])
        if isinstance(value, bool) != (bool in kinds) or not isinstance(value, kinds):
            hint = ""
            if isinstance(value, str) and "float" in options:
                hint = " (YAML reads 1e-4 as text: write 1.0e-4)"
            raise LeoInputError(
                f"{PARAMS_FILE}: key '{key}.{name}' must be {' or '.join(options)}, "
                f"got {value!r}{hint}"
            )
    return values


def run_config(params: dict[str, Any], run: str) -> tuple[LEOConfig, str, torch.device]:
    """``load_params("metatrain")`` and a run name -> (config, preset name, device)."""
    unknown = sorted(set(params) - KEYS)
    if unknown:
        raise LeoInputError(f"{PARAMS_FILE}: unknown key 'metatrain.{unknown[0]}'")
    seed = require(params["base"], "seed", int, "base")
    device = resolve_device(require(params, "device", str, "metatrain"), "metatrain.device")
    common = check_fields(require(params, "common", dict, "metatrain"), "metatrain.common")
    runs = require(params, "runs", dict, "metatrain")
    if run not in runs:
        raise LeoInputError(
            f"{PARAMS_FILE}: no run 'metatrain.runs.{run}' (runs: {', '.join(map(str, runs))})"
        )
    key = f"metatrain.runs.{run}"
    values = dict(require(runs, run, dict, "metatrain.runs"))
    preset = values.pop("preset", "default")
    if preset not in PRESETS:
        raise LeoInputError(
            f"{PARAMS_FILE}: key '{key}.preset' must be one of {', '.join(PRESETS)}, got {preset!r}"
        )
    check_fields(values, key)
    try:
        cfg = make_config(preset, **{"seed": seed, **common, **values})
    except LeoInputError as err:
        raise LeoInputError(f"{PARAMS_FILE}: {key}: {err}") from None
    return cfg, preset, device


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_work_dir(work: Path, fingerprint: dict[str, Any]) -> bool:
    """Keep ``work`` (resume) only if it holds the same fingerprint; return whether resuming."""
    stamp = work / "fingerprint.json"
    if stamp.is_file():
        try:
            if json.loads(stamp.read_text()) == fingerprint and (work / "state.pt").is_file():
                return True
        except json.JSONDecodeError:
            pass
    if work.exists():
        shutil.rmtree(work)
    write_json(stamp, fingerprint)
    return False


def run(run_name: str, params: dict[str, Any], embeddings: Path) -> dict[str, Any]:
    """Meta-train ``run_name`` on ``embeddings``; write the outs; return the metrics written."""
    cfg, preset, device = run_config(params, run_name)
    paths = {s: embeddings / f"{s}.parquet" for s in ("train", "val")}
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
        f"metatrain {run_name}: {cfg.num_classes}-way {cfg.num_shots}-shot, preset {preset}, "
        f"{cfg.num_steps} steps (validation every {cfg.validate_every}), {train.dim}-d "
        f"{embeddings}, {device.type}{', resuming' if resuming else ''}",
        flush=True,
    )
    result = meta_train(cfg, train, val, work, device=device, progress=sys.stderr.isatty())
    with atomic_dir(OUT / run_name) as tmp:
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
        "config": cfg.to_dict(),
    }
    write_text(REPORTS / run_name / "history.csv", (work / "history.csv").read_text())
    write_json(REPORTS / run_name / "metrics.json", metrics)
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
    metrics = run(args.run, load_params("metatrain"), Path(args.embeddings))
    print(
        f"metatrain {args.run}: best meta-validation accuracy {metrics['best_val_accuracy']:.4f} "
        f"at step {metrics['best_step']}/{metrics['steps']}, {metrics['wall_seconds']:.0f} s"
    )


if __name__ == "__main__":
    main()
