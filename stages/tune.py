"""Stage ``tune@<run>``: population-based training of the run's LEO hyperparameters on Ray Tune.

Usage: ``python -m stages.tune RUN [--embeddings DIR] [--progress]``. ``RUN`` is a key of
``metatrain.runs``; the search runs for the keys of ``tune.runs`` and starts from that run's
config. Reads from ``params.yaml``:

- ``tune.runs.RUN``: ``population`` (trials, at least 2), ``steps`` (outer steps of each),
  ``perturbation_interval`` (outer steps between rankings), ``space`` (entries on top of
  ``tune.space``);
- ``tune.space``: ``{name: {low, high, log} | {choices: [...]}}`` over the fields of
  :data:`leo.tune.space.TUNABLE`;
- ``tune``: ``address`` (a Ray cluster; null: ``$RAY_ADDRESS``, else a local Ray),
  ``storage`` (trial checkpoints), ``cpus_per_trial``, ``gpus_per_trial`` (fractions share),
  ``device``, ``max_failures``, ``synch``, ``quantile_fraction``, ``resample_probability``;
- ``base.seed``, ``metatrain.common``, ``metatrain.runs.RUN``: the config searched from.

Reads ``DIR/train.parquet`` and ``DIR/val.parquet`` (never ``test``): fitness is the
meta-validation accuracy, measured as ``metatrain`` measures it. Writes
``data/tune/RUN/best.yaml`` and ``reports/tune/RUN/`` (:mod:`leo.tune.outputs`); a run
without an entry in ``tune.runs`` gets an empty ``best.yaml`` at once. Trial checkpoints
live in ``<storage>/RUN/`` while it runs.

A finished search is kept in ``tmp/tune-done/RUN/`` with a fingerprint of what decides it
(the run's config, the search's settings, the embeddings' sha256, the code's); DVC reruns
this stage when ``metatrain.runs.RUN`` changes at all, ``from_tune`` included, and a rerun
with the same fingerprint writes the kept outputs again instead of searching anew.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

import leo
from leo.data.store import check_disjoint_classes, read_embeddings
from leo.settings import Settings
from leo.utils.atomic import atomic_dir, write_json
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256, json_sha256
from stages.common import REPORTS, settings, stage_main, where

DATA = Path("data/tune")
DONE = Path("tmp/tune-done")
CODE = ("tune", "core", "meta", "data/store.py")  # under leo/: what decides a search


def search_settings(params: Settings, run: str):
    """``tune`` and ``tune.runs.<run>`` of validated params -> ``SearchSettings``."""
    from leo.tune.search import SearchSettings

    opts, spec = params.tune, params.tune.runs[run]
    return SearchSettings(
        name=run,
        space=params.tune_space(run),
        population=spec.population,
        steps=spec.steps,
        perturbation_interval=spec.perturbation_interval,
        storage=Path(opts.storage),
        cpus_per_trial=opts.cpus_per_trial,
        gpus_per_trial=opts.gpus_per_trial,
        device=opts.device,
        address=opts.address,
        max_failures=opts.max_failures,
        quantile_fraction=opts.quantile_fraction,
        resample_probability=opts.resample_probability,
        seed=params.base.seed,
        synch=opts.synch,
        where=f"{where()}: tune",
    )


def fingerprint(params: Settings, run: str, paths: list[Path]) -> dict[str, Any]:
    """What decides ``run``'s search: config, search settings, data and code digests."""
    opts = params.tune
    root = Path(leo.__file__).parent
    search = {
        "run": params.tune.runs[run].model_dump(mode="json"),
        "space": {k: v.model_dump(mode="json") for k, v in opts.space.items()},
        **{k: getattr(opts, k) for k in ("synch", "quantile_fraction", "resample_probability")},
    }
    return {
        "config": params.run_config(run).to_dict(),
        "search": search,
        "data": {p.name: file_sha256(p) for p in paths},
        "code": json_sha256({str(p.relative_to(root)): file_sha256(p) for p in _sources(root)}),
        "stage": file_sha256(Path(__file__)),
    }


def _sources(root: Path) -> list[Path]:
    """The Python files of :data:`CODE` under ``root`` (bytecode caches left out)."""
    files = []
    for name in CODE:
        path = root / name
        files += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return files


def _reuse(done: Path, stamp: dict[str, Any], data: Path, reports: Path) -> dict | None:
    """Copy a kept search with the same fingerprint back into place; its metrics, or None."""
    try:
        if json.loads((done / "fingerprint.json").read_text()) != stamp:
            return None
    except (OSError, json.JSONDecodeError):
        return None
    for src, dst in ((done / "data", data), (done / "reports", reports)):
        with atomic_dir(dst) as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)
    return json.loads((reports / "metrics.json").read_text())


def _keep(done: Path, stamp: dict[str, Any], data: Path, reports: Path) -> None:
    with atomic_dir(done) as tmp:
        shutil.copytree(data, tmp / "data")
        shutil.copytree(reports, tmp / "reports")
        write_json(tmp / "fingerprint.json", stamp)


def run(
    run_name: str, params: Settings, embeddings: Path, progress: bool = False
) -> dict[str, Any]:
    """Search ``run_name``'s hyperparameters on ``embeddings``; write the outs; return metrics."""
    from leo.tune.outputs import write_no_search

    params.require_run(run_name)
    data, reports = DATA / run_name, REPORTS / "tune" / run_name
    if run_name not in params.tune.runs:
        print(f"tune {run_name}: no entry in tune.runs, nothing to search", flush=True)
        return write_no_search(run_name, data, reports)
    opts = search_settings(params, run_name)
    paths = [embeddings / f"{s}.parquet" for s in ("train", "val")]
    check_disjoint_classes(paths)
    stamp = fingerprint(params, run_name, paths)
    kept = _reuse(DONE / run_name, stamp, data, reports)
    if kept is not None:
        print(f"tune {run_name}: the same search finished before; its results from {DONE}")
        return kept
    train, val = (read_embeddings(p) for p in paths)
    if train.dim != val.dim:
        raise LeoInputError(f"{embeddings}: train is {train.dim}-d but val is {val.dim}-d")

    from leo.tune.outputs import write_outputs
    from leo.tune.search import search

    result = search(params.run_config(run_name), opts, train, val, progress=progress)
    metrics = write_outputs(result, opts, data, reports, dpi=params.report.dpi)
    _keep(DONE / run_name, stamp, data, reports)
    summary = result.summary
    for trial, rows in summary.histories.items():
        curve = ", ".join(f"{r['val_accuracy']:.4f}" for r in rows)
        print(f"  {trial}: val acc at steps {rows[0]['step']}..{rows[-1]['step']}: {curve}")
    for event in summary.lineage:
        changed = ", ".join(f"{k} {a:.3g}->{b:.3g}" for k, (a, b) in event["changed"].items())
        print(f"  step {event['step']}: {event['trial']} copied {event['source']} ({changed})")
    return metrics


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    parser = argparse.ArgumentParser(prog="python -m stages.tune", description=__doc__)
    parser.add_argument("run", help="a key of metatrain.runs (searched if also in tune.runs)")
    parser.add_argument(
        "--embeddings",
        default="data/embeddings",
        help="directory of {train,val}.parquet (default: data/embeddings)",
    )
    parser.add_argument("--progress", action="store_true", help="show Ray Tune's progress")
    args = parser.parse_args()
    metrics = run(args.run, settings(), Path(args.embeddings), progress=args.progress)
    if metrics.get("searched", True):
        print(
            f"tune {args.run}: best trial {metrics['best_trial']}, meta-validation accuracy "
            f"{metrics['best_val_accuracy']:.4f} at step {metrics['steps']} "
            f"({metrics['exploits']} exploits, {metrics['nodes']} node(s), "
            f"{metrics['wall_seconds']:.0f} s): {DATA / args.run / 'best.yaml'}"
        )


if __name__ == "__main__":
    main()
