"""Stage `prepare`: decode, resize and split ``data/raw/`` into ``data/prepared/``.

Usage: ``python -m stages.prepare [--raw data/raw] [--out data/prepared]``. Re-verifies the
sha256 of every raw file listed in ``data/raw/SOURCE.json``, reads the dataset named by
``base.dataset`` (:func:`leo.data.raw.readers.read_raw`: Omniglot, miniImageNet as CSV +
JPEG or as pickles, tieredImageNet, CIFAR-FS, FC100) and writes the format of
:mod:`leo.data.prepared`, the whole directory at once.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from leo.data.prepared import save_prepared
from leo.data.raw.fetch import read_source
from leo.data.raw.images import RawFiles
from leo.data.raw.readers import read_raw
from leo.settings import Settings
from leo.utils.atomic import atomic_dir
from leo.utils.errors import LeoInputError
from stages.common import settings, stage_main, where


def run(params: Settings, *, raw: str | Path, out: str | Path) -> dict:
    """Prepare the dataset of ``base.dataset`` from ``raw`` into ``out``.

    Returns:
        The manifest metadata written (before :func:`save_prepared` adds sizes and splits).
    """
    dataset = params.base.dataset
    section = params.prepare.for_dataset(dataset)
    options = {
        "min_classes": params.prepare.min_classes_per_split,
        "min_images": params.prepare.min_images_per_class,
        "workers": params.prepare.workers or os.cpu_count() or 1,
        "image_size": section.size,
        "channels": section.channels,
    }
    source = read_source(raw)
    if source["dataset"] != dataset:
        raise LeoInputError(
            f"{Path(raw) / 'SOURCE.json'}: holds {source['dataset']!r} but base.dataset is "
            f"{dataset!r} (run the download stage)"
        )
    if dataset == "omniglot" and section.split_file is None:
        raise LeoInputError(f"{where()}: prepare.omniglot.split_file: missing key")
    with RawFiles(raw, [f["name"] for f in source["files"]]) as files:
        splits, meta = read_raw(dataset, files, split_file=section.split_file, **options)
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
    meta = run(settings(), raw=args.raw, out=args.out)
    print(f"prepare: {meta['dataset']} -> {args.out}")


if __name__ == "__main__":
    main()
