"""Stage ``evaluate@<run>``: the paper's meta-test protocol on the best meta-trained LEO.

Usage: ``python -m stages.evaluate RUN [--embeddings DIR]``. Reads ``evaluate`` from
``params.yaml``: ``device``, ``num_episodes`` (10,000 in the paper), ``batch_size``
(episodes per batch), ``seed`` (the same seed draws the same episodes, whatever the model)
and ``min_queries_per_class``. Reads ``data/metatrain/RUN/best.pt`` (its config: shots,
evaluation steps, examples per class) and ``DIR/{train,val,test}.parquet`` (train and val
only for their class names: the three splits must not share a class); writes
``data/evaluate/RUN/accuracies.npy`` (one accuracy per episode, for paired comparisons) and
``reports/evaluate/RUN/metrics.json`` (mean accuracy, 95% CI half-width, episodes, queries
per class, seconds).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from leo.data.store import check_disjoint_classes, read_embeddings
from leo.meta.evaluate import evaluate, query_budget
from leo.meta.train import load_checkpoint
from leo.settings import Settings
from leo.utils.atomic import atomic_dir, write_json
from leo.utils.device import resolve_device
from leo.utils.errors import LeoInputError
from stages.common import EVALUATE, METATRAIN, REPORTS, parse_run_args, settings, stage_main, where


def run(run_name: str, params: Settings, embeddings: Path) -> dict[str, Any]:
    """Meta-test ``run_name``'s best checkpoint on ``embeddings/test.parquet``; write the outs."""
    params.require_run(run_name)
    opts = params.evaluate
    device = resolve_device(opts.device, f"{where()}: evaluate.device")
    weights, cfg, meta = load_checkpoint(METATRAIN / run_name / "best.pt")
    check_disjoint_classes([embeddings / f"{s}.parquet" for s in ("train", "val", "test")])
    test_path = embeddings / "test.parquet"
    test = read_embeddings(test_path)
    if meta.get("embedding_dim", test.dim) != test.dim:
        raise LeoInputError(
            f"{test_path}: {test.dim}-d embeddings, but the model of run {run_name!r} was "
            f"meta-trained on {meta['embedding_dim']}-d ones"
        )
    budget = query_budget(test, cfg)
    if budget.per_class < opts.min_queries_per_class:
        raise LeoInputError(
            f"{test_path}: class {budget.smallest_class!r} has {budget.smallest_count} examples: "
            f"{budget.per_class} queries per class at {cfg.num_shots}-shot for every episode, "
            f"fewer than evaluate.min_queries_per_class = {opts.min_queries_per_class}"
        )
    if budget.capped:
        print(f"evaluate {run_name}: {budget.describe()}", flush=True)
    with warnings.catch_warnings():  # said above, and in metrics.json
        warnings.simplefilter("ignore", UserWarning)
        result = evaluate(
            weights,
            cfg,
            test,
            num_episodes=opts.num_episodes,
            batch_size=opts.batch_size,
            seed=opts.seed,
            device=device,
            cpu_threads=None,  # the stage set base.cpu_threads already
        )
    with atomic_dir(EVALUATE / run_name) as tmp:
        np.save(tmp / "accuracies.npy", result.accuracies)
    metrics = {
        **result.summary(),
        "queries": budget.describe(),
        "num_shots": cfg.num_shots,
        "num_classes": cfg.num_classes,
        "test_classes": test.num_classes,
        "checkpoint_step": int(meta.get("step", -1)),
        "device": device.type,
    }
    write_json(REPORTS / "evaluate" / run_name / "metrics.json", metrics)
    return metrics


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    args = parse_run_args("evaluate", __doc__, "{train,val,test}.parquet")
    m = run(args.run, settings(), Path(args.embeddings))
    print(
        f"evaluate {args.run}: {m['num_classes']}-way {m['num_shots']}-shot meta-test accuracy "
        f"{100 * m['accuracy']:.2f}% +- {100 * m['ci95']:.2f}% ({m['episodes']} episodes, "
        f"{m['seconds']:.0f} s)"
    )


if __name__ == "__main__":
    main()
