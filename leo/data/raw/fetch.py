"""Getting raw files: copy or download each one, verify its sha256, record the provenance.

A *file spec* names one raw input (``name``, ``sha256`` and a ``url`` and/or a local
``path``). :func:`fetch_all` builds ``data/raw/`` from a list of specs: every file is taken
from a local directory when it is there, else downloaded over HTTP(S) with resume (a
``.part`` file outside the output, continued with a ``Range`` request), checked against its
sha256, and only then moved in. The whole output directory appears at once with a
``SOURCE.json`` (dataset, files, sha256), or not at all.

A raw input may also be a directory (e.g. miniImageNet's ``train.csv`` ... ``images/``); its
sha256 is that of its sorted ``sha256sum``-style listing (see :func:`tree_sha256`), which
``python -m leo.utils.hashing PATH`` prints.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from leo.utils.atomic import atomic_dir, remove_path, write_json
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256, tree_sha256

SOURCE_FILE = "SOURCE.json"
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileSpec:
    """One raw input.

    Attributes:
        name: file (or directory) name under ``data/raw/`` and under the local data directory.
        sha256: expected sha256 (lower-case hex); of the listing for a directory.
        url: optional http(s) URL to download it from.
        path: optional explicit local path (file or directory) to copy it from.
    """

    name: str
    sha256: str
    url: str | None = None
    path: str | None = None


# --- hashing ---------------------------------------------------------------------------


def _check_sha(name: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise LeoInputError(f"{name}: sha256 mismatch: expected {expected}, got {actual}")


# --- copying and downloading -----------------------------------------------------------


def copy_verified(src: Path, dest: Path, spec: FileSpec) -> None:
    """Copy ``src`` (a file or directory, never as a link) to ``dest`` and verify its sha256.

    Raises:
        LeoInputError: sha256 mismatch (``dest`` is removed).
    """
    try:
        if src.is_dir():
            shutil.copytree(src, dest)
        else:
            shutil.copyfile(src, dest)
        _check_sha(f"{src}", spec.sha256, tree_sha256(dest))
    except BaseException:
        remove_path(dest)
        raise


def part_path(partial_dir: str | os.PathLike, spec: FileSpec) -> Path:
    """Where the resumable partial download of ``spec`` lives (keyed by its expected sha256)."""
    return Path(partial_dir) / f"{spec.name}.{spec.sha256[:16]}.part"


class _Retryable(Exception):
    """A transfer that broke off and can be resumed."""


def download_verified(
    spec: FileSpec,
    dest: Path,
    partial_dir: str | os.PathLike,
    *,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
) -> None:
    """Download ``spec.url`` to ``dest`` through a resumable ``.part`` file; verify sha256.

    A dropped connection is retried ``retries`` times, each continuing the ``.part`` with a
    ``Range`` request; a server that ignores ``Range`` (status 200) restarts it. If a resumed
    file fails the checksum, it is downloaded once more from scratch.

    Raises:
        LeoInputError: HTTP error, retries exhausted (the ``.part`` is kept for next time),
            or sha256 mismatch (the ``.part`` is removed).
    """
    part = part_path(partial_dir, spec)
    part.parent.mkdir(parents=True, exist_ok=True)
    for fresh in (False, True):
        if fresh:
            part.unlink(missing_ok=True)
        resumed = _download_with_retries(
            spec.url, part, timeout=timeout, retries=retries, backoff=backoff
        )
        actual = file_sha256(part)
        if actual == spec.sha256:
            _move(part, dest)
            return
        if not resumed:
            break
    part.unlink(missing_ok=True)
    _check_sha(f"{spec.name} (from {spec.url})", spec.sha256, actual)


def _download_with_retries(
    url: str, part: Path, *, timeout: float, retries: int, backoff: float
) -> bool:
    """Download with retries; return whether any bytes came from before this attempt."""
    resumed = False
    for attempt in range(retries + 1):
        try:
            return _download_once(url, part, timeout) or resumed
        except urllib.error.HTTPError as err:
            if err.code < 500:
                raise LeoInputError(f"{url}: HTTP {err.code} {err.reason}") from None
            error: Exception = err
        except (_Retryable, urllib.error.URLError, http.client.HTTPException, OSError) as err:
            error = err
        resumed = resumed or (part.exists() and part.stat().st_size > 0)
        if attempt < retries:
            time.sleep(backoff * 2**attempt)
    raise LeoInputError(
        f"{url}: download failed after {retries + 1} attempts ({error}); "
        f"{part} is kept and resumed on the next run"
    )


def _download_once(url: str, part: Path, timeout: float) -> bool:
    """One request, continuing ``part`` if the server honours ``Range``; True if it did."""
    offset = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "leo-pipeline", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and offset:
            return True  # the .part is already complete: the checksum decides
        raise
    with resp:
        if offset and resp.status == 206 and _range_start(resp) == offset:
            mode = "ab"
        else:
            offset, mode = 0, "wb"
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        done = offset
        with (
            open(part, mode) as f,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                desc=part.name,
                disable=None,
                leave=False,
            ) as bar,
        ):
            while chunk := resp.read(CHUNK):
                f.write(chunk)
                done += len(chunk)
                bar.update(len(chunk))
    if total is not None and done < total:
        raise _Retryable(f"connection closed after {done} of {total} bytes")
    return mode == "ab"


def _range_start(resp: Any) -> int | None:
    match = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _move(src: Path, dest: Path) -> None:
    try:
        os.replace(src, dest)
    except OSError:  # another file system: copy, then drop the source
        shutil.copyfile(src, dest)
        src.unlink()


def local_source(spec: FileSpec, data_dir: str | os.PathLike | None, subdir: str) -> Path | None:
    """Return the local copy of ``spec``: its ``path``, else ``<data_dir>/<subdir>/<name>``.

    Raises:
        LeoInputError: an explicit ``path`` that does not exist.
    """
    if spec.path is not None:
        path = Path(spec.path).expanduser()
        if not path.exists():
            raise LeoInputError(f"{spec.name}: local path {path} not found")
        return path
    if data_dir is not None:
        path = Path(data_dir) / subdir / spec.name
        if path.exists():
            return path
    return None


def fetch_all(
    dataset: str,
    specs: list[FileSpec],
    out_dir: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    subdir: str = "",
    partial_dir: str | os.PathLike = "data/.partial",
    key: str = "download.files",
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Build ``out_dir`` (``data/raw``) with every file of ``specs`` and ``SOURCE.json``.

    Args:
        dataset: dataset name recorded in ``SOURCE.json``.
        specs: the files; each from its ``path``, else ``<data_dir>/<subdir>/<name>``, else
            its ``url``.
        out_dir: output directory, replaced as a whole on success, untouched on failure.
        data_dir: local data directory (``--data-dir`` / ``LEO_DATA_DIR``), or None.
        subdir: the dataset's folder inside ``data_dir``.
        partial_dir: where resumable ``.part`` downloads are kept between runs.
        key: params key of ``specs``, for messages.
        timeout, retries, backoff: HTTP read timeout (s), retries, first retry delay (s).
        log: called with one line per file (where it came from), if given.

    Returns:
        The ``SOURCE.json`` content.

    Raises:
        LeoInputError: no source for a file, a missing sha256, a download error or a
            checksum mismatch (nothing is written to ``out_dir``).
    """
    if data_dir is not None and not Path(data_dir).is_dir():
        raise LeoInputError(f"{data_dir}: data directory not found (--data-dir / LEO_DATA_DIR)")
    plan = []
    for i, spec in enumerate(specs):
        src = local_source(spec, data_dir, subdir)
        if not spec.sha256:
            hint = f" (the local copy {src} has sha256 {tree_sha256(src)})" if src else ""
            raise LeoInputError(f"params key '{key}[{i}].sha256' is not set{hint}")
        if src is None and spec.url is None:
            where = f"{Path(data_dir) / subdir}" if data_dir is not None else "no data dir given"
            raise LeoInputError(
                f"{spec.name}: not found locally ({where}) and '{key}[{i}].url' is not set"
            )
        plan.append((spec, src))
    files = []
    with atomic_dir(out_dir) as tmp:
        for spec, src in plan:
            dest = tmp / spec.name
            if src is not None:
                copy_verified(src, dest, spec)
            else:
                download_verified(
                    spec, dest, partial_dir, timeout=timeout, retries=retries, backoff=backoff
                )
            if log is not None:
                log(f"{spec.name}: sha256 ok, {'copied from ' + str(src) if src else spec.url}")
            # Content only (not where this copy came from), so a local copy and a download
            # give the same data/raw/ and DVC sees no change.
            entry = {"name": spec.name, "sha256": spec.sha256}
            entry["kind"] = "directory" if dest.is_dir() else "file"
            if spec.url is not None:
                entry["url"] = spec.url
            files.append(entry)
        source = {"dataset": dataset, "files": files}
        write_json(tmp / SOURCE_FILE, source)
    return source


def read_source(raw_dir: str | os.PathLike, *, verify: bool = True) -> dict:
    """Read ``<raw_dir>/SOURCE.json`` and (by default) re-verify every file's sha256.

    Raises:
        LeoInputError: no or malformed ``SOURCE.json``, a missing file, a sha256 mismatch.
    """
    raw_dir = Path(raw_dir)
    path = raw_dir / SOURCE_FILE
    if not path.is_file():
        raise LeoInputError(f"{path}: not found (run the download stage first)")
    try:
        source = json.loads(path.read_text())
        files = source["files"]
        entries = [(str(f["name"]), str(f["sha256"])) for f in files]
        str(source["dataset"])
    except (ValueError, KeyError, TypeError) as err:
        raise LeoInputError(f"{path}: malformed ({err!r})") from None
    if verify:
        for name, sha in entries:
            file = raw_dir / name
            if not file.exists():
                raise LeoInputError(f"{file}: listed in {path} but missing")
            _check_sha(str(file), sha, tree_sha256(file))
    return source
