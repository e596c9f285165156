"""sha256 of files, directory trees and JSON-able values: the one hashing helper.

A directory's digest is that of its sorted ``sha256sum``-style listing (the lines
``"<sha256>  <relative/path>\\n"`` of every file under it), so ``python -m leo.utils.hashing
PATH`` prints the value ``params.yaml`` expects for a file or a folder, and the same tree
hashes the same wherever it lies.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of one file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, or of a directory's sorted listing of file digests.

    The listing is what ``find . -type f -printf '%P\\0' | LC_ALL=C sort -z | xargs -0
    sha256sum`` prints inside the directory.
    """
    path = Path(path)
    if not path.is_dir():
        return file_sha256(path)
    files = sorted((p.relative_to(path).as_posix(), p) for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{file_sha256(p)}  {rel}\n" for rel, p in files)
    return hashlib.sha256(listing.encode()).hexdigest()


def bytes_sha256(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def json_sha256(value: Any) -> str:
    """Hex sha256 of a JSON-able value in canonical form (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=list)
    return bytes_sha256(text.encode())


def main(argv: list[str] | None = None) -> None:
    """Print the sha256 (as ``params.yaml`` expects it) of each file or directory given."""
    for arg in argv if argv is not None else sys.argv[1:]:
        print(f"{tree_sha256(arg)}  {arg}")


if __name__ == "__main__":
    main()
