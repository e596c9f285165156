"""Stage ``compare@<run>``: every method of :mod:`leo.methods` on the run's test episodes.

Usage: ``python -m stages.compare RUN [--embeddings DIR]``. Reads ``compare`` from
``params.yaml`` plus the run's LEO config (``metatrain``, as ``stages.metatrain``) and the
test episodes' ``seed`` and ``batch_size`` (``evaluate``). Keys of ``compare``:

- ``device``: auto | cpu | cuda;
- ``methods``: names of :data:`leo.methods.METHODS` (must include ``leo``);
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
checkpoints, per-episode accuracies) and ``reports/compare/RUN/`` (see :mod:`leo.compare`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from leo.compare import CompareSettings, compare
from leo.errors import LeoInputError
from leo.store import read_embeddings
from stages.common import PARAMS_FILE, load_params, parse_run_args, require, stage_main
from stages.metatrain import OUT as METATRAIN_OUT
from stages.metatrain import resolve_device, run_config

OUT = Path("data/compare")
REPORTS = Path("reports/compare")
KEYS = {
    "base",
    "device",
    "methods",
    "train_steps",
    "validate_every",
    "maml",
    "maml_runs",
    "num_episodes",
    "ensemble_episodes",
    "noise_seed",
    "figure_episodes",
    "figure_iterations",
}


def _count(params: dict[str, Any], key: str, minimum: int, nullable: bool = False) -> int | None:
    """``compare.<key>``: an int >= ``minimum`` (or null when ``nullable``)."""
    if nullable and params.get(key, 0) is None:
        return None
    value = require(params, key, int, "compare")
    if value < minimum:
        raise LeoInputError(f"{PARAMS_FILE}: key 'compare.{key}' must be >= {minimum}, got {value}")
    return value


def settings(params: dict[str, Any], evaluate: dict[str, Any], run: str) -> CompareSettings:
    """``load_params("compare")``, ``load_params("evaluate")`` and the run's name ->
    :class:`CompareSettings`."""
    unknown = sorted(set(params) - KEYS)
    if unknown:
        raise LeoInputError(f"{PARAMS_FILE}: unknown key 'compare.{unknown[0]}'")
    methods = require(params, "methods", list, "compare")
    maml = dict(require(params, "maml", dict, "compare"))
    per_run = require(params, "maml_runs", dict, "compare")
    if run in per_run:
        maml.update(require(per_run, run, dict, "compare.maml_runs"))
    episodes = _count(params, "num_episodes", 1, nullable=True)
    if episodes is None:
        episodes = require(evaluate, "num_episodes", int, "evaluate")
    values = {
        "train_steps": _count(params, "train_steps", 1, nullable=True),
        "validate_every": _count(params, "validate_every", 1, nullable=True),
        "maml": maml,
        "num_episodes": episodes,
        "batch_size": require(evaluate, "batch_size", int, "evaluate"),
        "seed": require(evaluate, "seed", int, "evaluate"),
        "ensemble_episodes": _count(params, "ensemble_episodes", 0),
        "noise_seed": require(params, "noise_seed", int, "compare"),
        "figure_episodes": _count(params, "figure_episodes", 0),
        "figure_iterations": _count(params, "figure_iterations", 1),
    }
    try:
        return CompareSettings(methods=tuple(methods), **values)
    except LeoInputError as err:
        raise LeoInputError(f"{PARAMS_FILE}: compare.methods: {err}") from None


def run(
    run_name: str,
    params: dict[str, Any],
    metatrain: dict[str, Any],
    evaluate: dict[str, Any],
    embeddings: Path,
) -> dict[str, Any]:
    """Compare every method of ``run_name``; write the outs; return table.json."""
    opts = settings(params, evaluate, run_name)
    device = resolve_device(require(params, "device", str, "compare"), "compare.device")
    base, _, _ = run_config(metatrain, run_name)
    splits = [read_embeddings(embeddings / f"{s}.parquet") for s in ("train", "val", "test")]
    if len({s.dim for s in splits}) != 1:
        raise LeoInputError(f"{embeddings}: train, val and test differ in dimension")
    return compare(
        run_name,
        base,
        opts,
        METATRAIN_OUT / run_name / "best.pt",
        *splits,
        OUT / run_name,
        REPORTS / run_name,
        device=device,
    )


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    args = parse_run_args("compare", __doc__, "{train,val,test}.parquet")
    table = run(
        args.run,
        load_params("compare"),
        load_params("metatrain"),
        load_params("evaluate"),
        Path(args.embeddings),
    )
    print(f"compare {args.run}: {table['episodes']} episodes, {table['seconds']:.0f} s")
    for name, row in table["methods"].items():
        print(
            f"  {name:24s} {100 * row['accuracy']:6.2f}% +- {100 * row['ci95']:.2f}  "
            f"vs leo {100 * row['difference']:+6.2f} +- {100 * row['difference_ci95']:.2f}"
        )


if __name__ == "__main__":
    main()
