"""Stage `prepare`: decode, resize and split ``data/raw/`` into ``data/prepared/``.

Usage: ``python -m stages.prepare [--raw data/raw] [--out data/prepared]``. Re-verifies the
sha256 of every raw file listed in ``data/raw/SOURCE.json``, reads the dataset named by
``base.dataset`` (:mod:`leo.data.omniglot`, :mod:`leo.data.mini_imagenet`,
:mod:`leo.data.tiered_imagenet`) and writes the format of :mod:`leo.data.prepared`, the
whole directory at once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from leo.atomic import atomic_dir
from leo.data.fetch import read_source
from leo.data.images import RawFiles
from leo.data.prepared import save_prepared
from leo.errors import LeoInputError
from stages.common import PARAMS_FILE, load_params, require, stage_main
from stages.download import DATASETS, dataset_name

KEYS = {"base", "min_classes_per_split", "min_images_per_class", "workers", *DATASETS}


def _positive(params: dict[str, Any], key: str, section: str, minimum: int = 1) -> int:
    value = require(params, key, int, section)
    if value < minimum:
        raise LeoInputError(f"{PARAMS_FILE}: key '{section}.{key}' must be >= {minimum}")
    return value


def image_options(section: dict[str, Any], key: str) -> tuple[tuple[int, int], int]:
    """Return ``((H, W), channels)`` from ``prepare.<dataset>``.

    ``image_size`` is an int (square) or ``[H, W]``; ``channels`` is 1 (grey) or 3 (RGB).
    """
    size = section.get("image_size")
    if isinstance(size, int) and not isinstance(size, bool):
        size = [size, size]
    if not (
        isinstance(size, list)
        and len(size) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise LeoInputError(
            f"{PARAMS_FILE}: key '{key}.image_size' must be a positive int or [H, W], got {size!r}"
        )
    channels = require(section, "channels", int, key)
    if channels not in (1, 3):
        raise LeoInputError(f"{PARAMS_FILE}: key '{key}.channels' must be 1 or 3, got {channels}")
    return (size[0], size[1]), channels


def run(params: dict[str, Any], *, raw: str | Path, out: str | Path) -> dict:
    """Prepare the dataset of ``params`` (``load_params("prepare")``) from ``raw`` into ``out``.

    Returns:
        The manifest metadata written (before :func:`save_prepared` adds sizes and splits).
    """
    unknown = set(params) - KEYS
    if unknown:
        raise LeoInputError(
            f"{PARAMS_FILE}: unknown key(s) {sorted(f'prepare.{k}' for k in unknown)}"
        )
    dataset = dataset_name(params)
    options = {
        "min_classes": _positive(params, "min_classes_per_split", "prepare"),
        "min_images": _positive(params, "min_images_per_class", "prepare"),
        "workers": _positive(params, "workers", "prepare", minimum=0) or os.cpu_count() or 1,
    }
    key = f"prepare.{dataset}"
    section = require(params, dataset, dict, "prepare")
    options["image_size"], options["channels"] = image_options(section, key)
    source = read_source(raw)
    if source["dataset"] != dataset:
        raise LeoInputError(
            f"{Path(raw) / 'SOURCE.json'}: holds {source['dataset']!r} but base.dataset is "
            f"{dataset!r} (run the download stage)"
        )
    with RawFiles(raw, [f["name"] for f in source["files"]]) as files:
        if dataset == "omniglot":
            from leo.data.omniglot import read_omniglot

            split_file = require(section, "split_file", str, key)
            splits, meta = read_omniglot(files, split_file, **options)
        elif dataset == "miniImageNet":
            from leo.data.mini_imagenet import read_mini_imagenet

            splits, meta = read_mini_imagenet(files, **options)
        else:
            from leo.data.tiered_imagenet import read_tiered_imagenet

            splits, meta = read_tiered_imagenet(files, **options)
    meta = {
        "dataset": dataset,
        **meta,
        "sources": [{"name": f["name"], "sha256": f["sha256"]} for f in source["files"]],
    }
    with atomic_dir(out) as tmp:
        save_prepared(tmp, splits, meta)
    return meta


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    parser = argparse.ArgumentParser(prog="python -m stages.prepare", description=__doc__)
    parser.add_argument("--raw", default="data/raw", help="raw directory (default: data/raw)")
    parser.add_argument(
        "--out", default="data/prepared", help="output directory (default: data/prepared)"
    )
    args = parser.parse_args()
    meta = run(load_params("prepare"), raw=args.raw, out=args.out)
    print(f"prepare: {meta['dataset']} -> {args.out}")


if __name__ == "__main__":
    main()
