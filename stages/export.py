"""Stage ``export@<run>``: the trained model as a self-contained few-shot classifier bundle.

Usage: ``python -m stages.export RUN [--embeddings DIR]``. Reads the frozen backbone
``data/pretrain/backbone.pt``, the run's LEO ``data/metatrain/RUN/best.pt``, the prepared
test images ``data/prepared/{manifest.json,test.npz}`` (preprocessing, dataset, split file),
``DIR/test.parquet`` and ``reports/evaluate/RUN/metrics.json`` (meta-test accuracy); writes
``data/export/RUN/`` (:mod:`leo.classify.bundle`: ``bundle.json``, ``backbone.pt``,
``leo.pt``, ``README.md``), declared in ``dvc.yaml``'s ``artifacts`` as a model.

Provenance in ``bundle.json``: dataset, split file and its sha256, run, the git commit (and
whether the work tree had uncommitted changes), the params that made the model (data,
backbone, the run's LEO config, the meta-test protocol) and their sha256, the sha256 of the
backbone and of the LEO checkpoint, the meta-test accuracy, and ``check``: the bundle, from
the prepared test images, against the pipeline's evaluation from the stored embeddings on
``export.check_episodes`` episodes drawn with ``evaluate.seed``
(:func:`leo.classify.check.check_bundle`). Refused: embeddings not made by this backbone
(e.g. the published ones: their backbone is not in the pipeline), or a backbone pre-trained
on other prepared data.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from leo.backbone.wrn import load_backbone
from leo.classify.bundle import read_bundle, write_bundle
from leo.classify.check import check_bundle
from leo.classify.classifier import FewShotClassifier
from leo.data.prepared import MANIFEST, load_manifest, load_prepared_split
from leo.data.store import read_embeddings
from leo.meta.train import load_checkpoint
from leo.settings import Settings
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256, json_sha256
from stages.common import METATRAIN, PREPARED, REPORTS, parse_run_args, settings, stage_main

BACKBONE = Path("data/pretrain/backbone.pt")
EXPORT = Path("data/export")
METATEST_KEYS = ("accuracy", "ci95", "episodes", "num_classes", "num_shots", "queries_per_class")


def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the working directory's repo."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def model_params_of(params: Settings, run_name: str) -> dict[str, Any]:
    """The params that made the model, by dotted key (those the upstream stages list in
    ``dvc.yaml``): data, backbone, the run's LEO config and the meta-test protocol."""
    dataset = params.base.dataset
    dump = params.model_dump(mode="json", by_alias=True)
    cfg, preset = params.run_configs[run_name]
    return {
        "base.seed": params.base.seed,
        "base.dataset": dataset,
        "prepare.min_classes_per_split": params.prepare.min_classes_per_split,
        "prepare.min_images_per_class": params.prepare.min_images_per_class,
        f"prepare.{dataset}": dump["prepare"][dataset],
        "pretrain.heldout_fraction": params.pretrain.heldout_fraction,
        f"pretrain.{dataset}": dump["pretrain"][dataset],
        "metatrain.preset": preset,
        "metatrain.config": cfg.to_dict(),
        "evaluate.num_episodes": params.evaluate.num_episodes,
        "evaluate.batch_size": params.evaluate.batch_size,
        "evaluate.seed": params.evaluate.seed,
    }


def read_metrics(path: Path) -> dict[str, Any]:
    """The evaluate stage's metrics of the run."""
    if not path.is_file():
        raise LeoInputError(f"{path}: no meta-test metrics (run the evaluate stage first)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise LeoInputError(f"{path}: not valid JSON ({err})") from None


def run(run_name: str, params: Settings, embeddings: Path) -> dict[str, Any]:
    """Export ``run_name``: write ``data/export/<run>/``; return its ``bundle.json``."""
    params.require_run(run_name)
    manifest = load_manifest(PREPARED)
    backbone, ckpt = load_backbone(BACKBONE)
    backbone_sha = file_sha256(BACKBONE)
    if ckpt.get("manifest_sha256") != file_sha256(PREPARED / MANIFEST):
        raise LeoInputError(
            f"{BACKBONE}: pre-trained on other prepared data than {PREPARED / MANIFEST} "
            "(rerun the pretrain stage)"
        )
    test_path = embeddings / "test.parquet"
    test = read_embeddings(test_path)
    if test.provenance.get("backbone_sha256") != backbone_sha:
        raise LeoInputError(
            f"{test_path}: not made by {BACKBONE} (its provenance names another backbone); "
            "a bundle needs the backbone that made the embeddings LEO was trained on"
        )
    checkpoint = METATRAIN / run_name / "best.pt"
    leo_params, cfg, meta = load_checkpoint(checkpoint)
    metrics = read_metrics(REPORTS / "evaluate" / run_name / "metrics.json")
    provenance = {
        "dataset": manifest.get("dataset"),
        "run": run_name,
        "split_file": manifest.get("split_file"),
        "split_file_sha256": manifest.get("split_file_sha256"),
        **git_state(),
        "params": (model_params := model_params_of(params, run_name)),
        "params_sha256": json_sha256(model_params),
        "backbone_sha256": backbone_sha,
        "checkpoint_sha256": file_sha256(checkpoint),
        "checkpoint_step": int(meta.get("step", -1)),
        "val_accuracy": meta.get("val_accuracy"),
        "metatest": {k: metrics.get(k) for k in METATEST_KEYS},
    }
    out = EXPORT / run_name
    bundle_args = dict(
        backbone=backbone,
        params=leo_params,
        config=cfg,
        image_size=tuple(manifest["image_size"]),
    )
    opts = params.export
    if opts.check_episodes:  # check a written and re-read bundle before writing the real one
        with tempfile.TemporaryDirectory(prefix=".export-check.", dir=EXPORT.parent) as tmp:
            write_bundle(Path(tmp) / "bundle", **bundle_args, provenance=provenance)
            provenance["check"] = check_bundle(
                FewShotClassifier(read_bundle(Path(tmp) / "bundle")),
                leo_params,
                cfg,
                test,
                load_prepared_split(PREPARED, "test"),
                episodes=opts.check_episodes,
                queries=opts.check_queries,
                seed=params.evaluate.seed,
                source=str(test_path),
            )
    return write_bundle(out, **bundle_args, provenance=provenance)


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    args = parse_run_args("export", __doc__, "test.parquet")
    info = run(args.run, settings(), Path(args.embeddings))
    prov = info["provenance"]
    check = prov.get("check")
    agreed = f", {100 * check['agreement']:.1f}% agreement with evaluate" if check else ""
    accuracy = prov["metatest"].get("accuracy")
    shown = f"{100 * accuracy:.2f}%" if isinstance(accuracy, float) else "unknown"
    print(
        f"export {args.run}: {info['backbone']['architecture']} + LEO -> {EXPORT / args.run} "
        f"(meta-test accuracy {shown}{agreed})"
    )


if __name__ == "__main__":
    main()
