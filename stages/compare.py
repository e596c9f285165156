"""Stage ``compare@<run>``: every method of :mod:`leo.comparison.methods` on the test episodes.

Usage: ``python -m stages.compare RUN [--embeddings DIR]``. Reads ``compare`` from
``params.yaml`` plus the run's LEO config (``metatrain``, as ``stages.metatrain``) and the
test episodes' ``seed`` and ``batch_size`` (``evaluate``). Keys of ``compare``:

- ``device``: auto | cpu | cuda;
- ``methods``: names of :data:`leo.comparison.methods.METHODS` (must include ``leo``);
- ``train_steps``, ``validate_every``: outer steps and validation interval of the trained
  ablations and MAML (null: the run's own, as plain LEO was trained);
- ``maml``: MAMLConfig overrides for every run (e.g. ``inner_lr``), and ``maml_runs.RUN``:
  overrides for one run on top (MAML's fixed inner step size depends on the shots);
- ``num_episodes``: test episodes of every method (null: ``evaluate.num_episodes``);
- ``ensemble_episodes``: episodes of the latent-ensemble table (0: none);
- ``noise_seed``: the ensembles' sample noise;
- ``figure_episodes``, ``figure_iterations``: Figure 2's validation episodes and t-SNE steps.

Reads ``data/metatrain/RUN/best.pt`` (plain LEO, not retrained) and
``DIR/{train,val,test}.parquet``; writes ``data/compare/RUN/`` (trained methods'
checkpoints, per-episode accuracies) and ``reports/compare/RUN/`` (see
:mod:`leo.comparison.compare`). The methods train in ``tmp/compare/RUN/`` (outside DVC's outs,
which DVC clears before a run): a killed run with the same inputs resumes them there.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

from leo.comparison.compare import CompareSettings, compare
from leo.comparison.methods import TUNED
from leo.data.store import check_disjoint_classes, read_embeddings
from leo.meta.loop import STATE_FILE
from leo.settings import Settings
from leo.tune.outputs import read_best
from leo.tune.space import apply
from leo.utils.atomic import atomic_dir
from leo.utils.device import resolve_device
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256
from stages.common import (
    COMPARE,
    METATRAIN,
    REPORTS,
    STAMP,
    parse_run_args,
    prepare_work_dir,
    settings,
    stage_main,
    where,
)

TUNE = Path("data/tune")
WORK = Path("tmp/compare")  # the trainings, resumable after a kill (DVC clears the outs)


def tuned_values(params: Settings, run: str) -> dict[str, Any]:
    """``tune@<run>``'s hyperparameters (``data/tune/<run>/best.yaml``); {} without a search."""
    return read_best(TUNE / run / "best.yaml") if run in params.tune.runs else {}


def compare_settings(params: Settings, run: str) -> CompareSettings:
    """The validated ``compare`` and ``evaluate`` sections -> :class:`CompareSettings`.

    ``leo-pbt`` is left out for a run without a search, and for a run meta-trained with
    its tuned values (``from_tune``: then ``leo`` is the tuned LEO)."""
    opts, ev = params.compare, params.evaluate
    tuned = tuned_values(params, run)
    keep_tuned = bool(tuned) and not params.from_tune(run)
    return CompareSettings(
        methods=tuple(m for m in opts.methods if m != TUNED or keep_tuned),
        tuned=tuned,
        train_steps=opts.train_steps,
        validate_every=opts.validate_every,
        maml=params.maml_overrides(run),
        num_episodes=opts.num_episodes or ev.num_episodes,
        batch_size=ev.batch_size,
        seed=ev.seed,
        ensemble_episodes=opts.ensemble_episodes,
        noise_seed=opts.noise_seed,
        figure_episodes=opts.figure_episodes,
        figure_iterations=opts.figure_iterations,
    )


def run(run_name: str, params: Settings, embeddings: Path) -> dict[str, Any]:
    """Compare every method of ``run_name``; write the outs; return table.json."""
    params.require_run(run_name)
    opts = compare_settings(params, run_name)
    device = resolve_device(params.compare.device, f"{where()}: compare.device")
    base = params.run_config(run_name)
    if params.from_tune(run_name):  # as metatrain trained it
        base = apply(base, tuned_values(params, run_name), f"{TUNE / run_name / 'best.yaml'}")
    paths = [embeddings / f"{s}.parquet" for s in ("train", "val", "test")]
    check_disjoint_classes(paths)
    splits = [read_embeddings(p) for p in paths]
    if len({s.dim for s in splits}) != 1:
        raise LeoInputError(f"{embeddings}: train, val and test differ in dimension")
    leo = METATRAIN / run_name / "best.pt"
    work = WORK / run_name
    fingerprint = {
        "config": base.to_dict(),
        "settings": dataclasses.asdict(opts),
        "device": device.type,
        "leo_sha256": file_sha256(leo),
        **{f"{p.stem}_sha256": file_sha256(p) for p in paths},
    }
    if prepare_work_dir(work, fingerprint):
        print(f"compare {run_name}: resuming the trainings of {work}", flush=True)
    table = compare(
        run_name,
        base,
        opts,
        leo,
        *splits,
        work,
        REPORTS / "compare" / run_name,
        device=device,
        cpu_threads=None,  # the stage set base.cpu_threads already
    )
    # The outs: the trained methods' best.pt and the per-episode accuracies; their state.pt
    # (resume only, with timings) stay behind and go.
    with atomic_dir(COMPARE / run_name) as tmp:
        shutil.copytree(
            work, tmp, dirs_exist_ok=True, ignore=shutil.ignore_patterns(STATE_FILE, STAMP)
        )
    shutil.rmtree(work)
    return table


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    args = parse_run_args("compare", __doc__, "{train,val,test}.parquet")
    table = run(args.run, settings(), Path(args.embeddings))
    print(f"compare {args.run}: {table['episodes']} episodes, {table['seconds']:.0f} s")
    for name, row in table["methods"].items():
        print(
            f"  {name:24s} {100 * row['accuracy']:6.2f}% +- {100 * row['ci95']:.2f}  "
            f"vs leo {100 * row['difference']:+6.2f} +- {100 * row['difference_ci95']:.2f}"
        )


if __name__ == "__main__":
    main()
