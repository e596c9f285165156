"""Stage `download`: get the raw dataset named by ``base.dataset`` into ``data/raw/``.

Usage: ``python -m stages.download [--data-dir DIR] [--out data/raw]``. Each file of
``download.<dataset>.files`` comes from its ``path``, else ``<data dir>/<subdir>/<name>``
(the data dir is ``--data-dir`` or ``$LEO_DATA_DIR``), else its ``url`` (resumable); its
sha256 is always checked. See :mod:`leo.data.raw.fetch`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

from leo.data.raw.fetch import FileSpec, fetch_all
from leo.settings import Settings
from leo.utils.errors import LeoInputError
from stages.common import settings, stage_main, where


def run(
    params: Settings,
    *,
    out: str | Path,
    data_dir: str | Path | None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Fetch the files of ``download.<base.dataset>`` into ``out``; return ``SOURCE.json``."""
    dataset = params.base.dataset
    section = params.download.for_dataset(dataset)
    key = f"download.{dataset}.files"
    if not section.files:
        raise LeoInputError(f"{where()}: {key}: must list at least one file")
    specs = [FileSpec(f.name, f.sha256 or "", f.url, f.path) for f in section.files]
    return fetch_all(
        dataset,
        specs,
        out,
        data_dir=data_dir,
        subdir=section.subdir or dataset,
        partial_dir=params.download.partial_dir,
        key=key,
        timeout=params.download.timeout_s,
        retries=params.download.retries,
        log=log,
    )


@stage_main
def main() -> None:
    """Parse the flags, read ``params.yaml`` and run the stage."""
    parser = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__)
    parser.add_argument(
        "--data-dir",
        default=os.environ.get("LEO_DATA_DIR") or None,
        help="local directory holding <subdir>/<file> (default: $LEO_DATA_DIR)",
    )
    parser.add_argument("--out", default="data/raw", help="output directory (default: data/raw)")
    args = parser.parse_args()
    source = run(settings(), out=args.out, data_dir=args.data_dir, log=print)
    print(f"download: {source['dataset']} -> {args.out} ({len(source['files'])} files)")


if __name__ == "__main__":
    main()
