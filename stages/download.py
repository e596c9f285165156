"""Stage `download`: get the raw dataset named by ``base.dataset`` into ``data/raw/``.

Usage: ``python -m stages.download [--data-dir DIR] [--out data/raw]``. Each file of
``download.<dataset>.files`` comes from its ``path``, else ``<data dir>/<subdir>/<name>``
(the data dir is ``--data-dir`` or ``$LEO_DATA_DIR``), else its ``url`` (resumable); its
sha256 is always checked. See :mod:`leo.data.fetch`.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from leo.data.fetch import SOURCE_FILE, FileSpec, fetch_all
from leo.errors import LeoInputError
from stages.common import PARAMS_FILE, load_params, require, stage_main

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
DATASETS = ("omniglot", "miniImageNet", "tieredImageNet")
KEYS = {"base", "partial_dir", "timeout_s", "retries", *DATASETS}


def dataset_name(params: dict[str, Any]) -> str:
    """Return ``base.dataset``, checked against the supported datasets."""
    dataset = require(params["base"], "dataset", str, "base")
    if dataset not in DATASETS:
        raise LeoInputError(
            f"{PARAMS_FILE}: key 'base.dataset' must be one of {', '.join(DATASETS)}, "
            f"got {dataset!r}"
        )
    return dataset


def parse_file_specs(entries: Any, key: str) -> list[FileSpec]:
    """Validate a params list of ``{name, sha256, url?, path?}`` mappings.

    Args:
        entries: the value of the params key.
        key: its dotted name, for messages (e.g. ``download.omniglot.files``).

    Raises:
        LeoInputError: naming the malformed key.
    """
    if not isinstance(entries, list) or not entries:
        raise LeoInputError(f"{PARAMS_FILE}: key '{key}' must be a non-empty list of files")
    specs, names = [], set()
    for i, entry in enumerate(entries):
        where = f"{key}[{i}]"
        if not isinstance(entry, dict):
            raise LeoInputError(
                f"{PARAMS_FILE}: key '{where}' must be a mapping with name and sha256"
            )
        unknown = set(entry) - {"name", "sha256", "url", "path"}
        if unknown:
            raise LeoInputError(
                f"{PARAMS_FILE}: key '{where}' has unknown field(s) {sorted(unknown)}"
            )
        name = entry.get("name")
        if not isinstance(name, str) or name in ("", ".", "..", SOURCE_FILE) or "/" in name:
            raise LeoInputError(
                f"{PARAMS_FILE}: key '{where}.name' must be a plain file name, got {name!r}"
            )
        if name in names:
            raise LeoInputError(f"{PARAMS_FILE}: key '{where}.name': {name!r} is listed twice")
        names.add(name)
        for field in ("url", "path"):
            if entry.get(field) is not None and not isinstance(entry[field], str):
                raise LeoInputError(f"{PARAMS_FILE}: key '{where}.{field}' must be a string")
        url = entry.get("url")
        if url is not None and not url.startswith(("http://", "https://")):
            raise LeoInputError(
                f"{PARAMS_FILE}: key '{where}.url' must be an http(s) URL, got {url!r}"
            )
        sha = entry.get("sha256")
        if sha is not None and (not isinstance(sha, str) or not _SHA256.match(sha.lower())):
            raise LeoInputError(
                f"{PARAMS_FILE}: key '{where}.sha256' must be 64 hex digits, got {sha!r}"
            )
        specs.append(FileSpec(name, sha.lower() if sha else "", url, entry.get("path")))
    return specs


def run(
    params: dict[str, Any],
    *,
    out: str | Path,
    data_dir: str | Path | None,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Fetch the files of ``params`` (``load_params("download")``) into ``out``.

    Returns:
        The ``SOURCE.json`` content.
    """
    unknown = set(params) - KEYS
    if unknown:
        raise LeoInputError(
            f"{PARAMS_FILE}: unknown key(s) {sorted(f'download.{k}' for k in unknown)}"
        )
    dataset = dataset_name(params)
    section = require(params, dataset, dict, "download")
    key = f"download.{dataset}"
    subdir = require(section, "subdir", str, key) if "subdir" in section else dataset
    timeout = require(params, "timeout_s", (int, float), "download")
    retries = require(params, "retries", int, "download")
    if timeout <= 0 or retries < 0:
        raise LeoInputError(
            f"{PARAMS_FILE}: keys 'download.timeout_s' must be > 0 and 'download.retries' >= 0"
        )
    return fetch_all(
        dataset,
        parse_file_specs(section.get("files"), f"{key}.files"),
        out,
        data_dir=data_dir,
        subdir=subdir,
        partial_dir=require(params, "partial_dir", str, "download"),
        key=f"{key}.files",
        timeout=float(timeout),
        retries=retries,
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
    source = run(load_params("download"), out=args.out, data_dir=args.data_dir, log=print)
    print(f"download: {source['dataset']} -> {args.out} ({len(source['files'])} files)")


if __name__ == "__main__":
    main()
