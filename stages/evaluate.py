"""Stage ``evaluate@<run>``: the paper's meta-test protocol on the best meta-trained LEO.

Usage: ``python -m stages.evaluate RUN [--embeddings DIR]``. Reads ``evaluate`` from
``params.yaml``: ``device`` (auto | cpu | cuda), ``num_episodes`` (10,000 in the paper),
``batch_size`` (episodes per batch) and ``seed`` (the same seed draws the same episodes,
whatever the model). Reads ``data/metatrain/RUN/best.pt`` (its config: shots, evaluation
steps, examples per class) and ``DIR/test.parquet``; writes
``data/evaluate/RUN/accuracies.npy`` (one accuracy per episode, for paired comparisons) and
``reports/evaluate/RUN/metrics.json`` (mean accuracy, 95% CI half-width, episodes, seconds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from leo.atomic import atomic_dir, write_json
from leo.errors import LeoInputError
from leo.evaluate import evaluate
from leo.store import read_embeddings
from leo.train import load_checkpoint
from stages.common import PARAMS_FILE, load_params, parse_run_args, require, stage_main
from stages.metatrain import OUT as METATRAIN_OUT
from stages.metatrain import resolve_device

OUT = Path("data/evaluate")
REPORTS = Path("reports/evaluate")
KEYS = {"base", "device", "num_episodes", "batch_size", "seed"}


def options(params: dict[str, Any]) -> dict[str, Any]:
    """``load_params("evaluate")`` -> keyword arguments of :func:`leo.evaluate.evaluate`."""
    unknown = sorted(set(params) - KEYS)
    if unknown:
        raise LeoInputError(f"{PARAMS_FILE}: unknown key 'evaluate.{unknown[0]}'")
    values = {k: require(params, k, int, "evaluate") for k in ("num_episodes", "batch_size")}
    for key, value in values.items():
        if value < 1:
            raise LeoInputError(f"{PARAMS_FILE}: key 'evaluate.{key}' must be >= 1, got {value}")
    values["seed"] = require(params, "seed", int, "evaluate")
    values["device"] = resolve_device(require(params, "device", str, "evaluate"), "evaluate.device")
    return values


def run(run_name: str, params: dict[str, Any], embeddings: Path) -> dict[str, Any]:
    """Meta-test ``run_name``'s best checkpoint on ``embeddings/test.parquet``; write the outs."""
    kwargs = options(params)
    weights, cfg, meta = load_checkpoint(METATRAIN_OUT / run_name / "best.pt")
    test = read_embeddings(embeddings / "test.parquet")
    if meta.get("embedding_dim", test.dim) != test.dim:
        raise LeoInputError(
            f"{embeddings / 'test.parquet'}: {test.dim}-d embeddings, but the model of run "
            f"{run_name!r} was meta-trained on {meta['embedding_dim']}-d ones"
        )
    result = evaluate(weights, cfg, test, progress=False, **kwargs)
    with atomic_dir(OUT / run_name) as tmp:
        np.save(tmp / "accuracies.npy", result.accuracies)
    metrics = {
        **result.summary(),
        "num_shots": cfg.num_shots,
        "num_classes": cfg.num_classes,
        "test_classes": test.num_classes,
        "checkpoint_step": int(meta.get("step", -1)),
        "device": kwargs["device"].type,
    }
    write_json(REPORTS / run_name / "metrics.json", metrics)
    return metrics


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    args = parse_run_args("evaluate", __doc__, "test.parquet")
    m = run(args.run, load_params("evaluate"), Path(args.embeddings))
    print(
        f"evaluate {args.run}: {m['num_classes']}-way {m['num_shots']}-shot meta-test accuracy "
        f"{100 * m['accuracy']:.2f}% +- {100 * m['ci95']:.2f}% ({m['episodes']} episodes, "
        f"{m['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
