"""From raw encoded images to prepared uint8 arrays.

- :class:`RawFiles`: every file under ``data/raw``, looking inside zip and tar archives, so
  a reader finds e.g. ``train.csv`` whether it was downloaded alone, in a directory or in
  an archive;
- :func:`decode_image` / :func:`decode_many`: decode (PNG, JPEG, ...), convert to grey or
  RGB and resize with antialiasing (PIL's Lanczos filter) to ``(H, W, C)`` uint8;
  :func:`prepare_image` is that conversion alone (also what the exported classifier applies
  to a user's images), :func:`resize_many` the same for images stored as arrays;
- :func:`check_classes`: the class checks every dataset shares (empty class, a class in two
  splits, too few classes or images for N-way K-shot episodes with queries).
"""

from __future__ import annotations

import io
import lzma
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image
from tqdm import tqdm

from leo.utils.errors import LeoInputError

_BATCH = 512
# What a damaged archive member raises while it is opened or inflated: a bad header, a
# failing CRC (BadZipFile), a corrupt deflate, bzip2 or lzma stream, a truncated file.
_READ_ERRORS = (
    zipfile.BadZipFile,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    OSError,
    EOFError,
    ValueError,
)


@dataclass(frozen=True)
class Member:
    """One file inside ``data/raw``: the top-level entry and the path inside it.

    Attributes:
        entry: the top-level file or directory under ``data/raw``.
        inner: posix path inside a directory or archive; ``""`` for a plain top-level file.
    """

    entry: Path
    inner: str

    @property
    def basename(self) -> str:
        """The file name alone."""
        return Path(self.inner).name if self.inner else self.entry.name

    def __str__(self) -> str:
        return f"{self.entry}:{self.inner}" if self.inner else str(self.entry)


class RawFiles:
    """Index of all files under a raw directory, archives (zip, tar, tar.gz) opened in place."""

    def __init__(self, root: str | os.PathLike, entries: Iterable[str]) -> None:
        """Index the top-level ``entries`` (names) of ``root``.

        Raises:
            LeoInputError: an entry that is missing or a corrupt archive.
        """
        self._zips: dict[Path, zipfile.ZipFile] = {}
        self._tars: dict[Path, tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]] = {}
        self.members: list[Member] = []
        self.dirs: list[Member] = []  # directories, including a zip's explicit folder entries
        try:
            for name in entries:
                self._index(Path(root) / name)
        except BaseException:
            self.close()
            raise

    def _index(self, path: Path) -> None:
        if path.is_dir():
            for p in sorted(path.rglob("*")):
                kind = self.members if p.is_file() else self.dirs if p.is_dir() else None
                if kind is not None:
                    kind.append(Member(path, p.relative_to(path).as_posix()))
        elif not path.is_file():
            raise LeoInputError(f"{path}: not found")
        elif path.suffix.lower() == ".zip":
            try:
                zf = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError) as err:
                raise LeoInputError(f"{path}: not a readable zip archive ({err})") from None
            self._zips[path] = zf
            for n in zf.namelist():
                if n.endswith("/"):
                    self.dirs.append(Member(path, n.rstrip("/")))
                else:
                    self.members.append(Member(path, n))
        elif _is_tar_name(path.name):
            try:
                tf = tarfile.open(path)
                infos = {i.name.removeprefix("./"): i for i in tf.getmembers() if i.isfile()}
                self.dirs += [
                    Member(path, i.name.removeprefix("./")) for i in tf.getmembers() if i.isdir()
                ]
            except (tarfile.TarError, OSError, EOFError) as err:
                raise LeoInputError(f"{path}: not a readable tar archive ({err})") from None
            self._tars[path] = (tf, infos)
            self.members += [Member(path, n) for n in infos]
        else:
            self.members.append(Member(path, ""))

    def find(self, basename: str) -> list[Member]:
        """All members whose file name is ``basename``."""
        return [m for m in self.members if m.basename == basename]

    def find_one(self, basename: str) -> Member:
        """The one member named ``basename``.

        Raises:
            LeoInputError: none or several.
        """
        found = self.find(basename)
        if len(found) != 1:
            what = "not found" if not found else f"ambiguous ({', '.join(map(str, found))})"
            raise LeoInputError(f"{basename}: {what} in the raw data")
        return found[0]

    def open(self, member: Member) -> IO[bytes]:
        """Open one member for binary reading."""
        try:
            if member.entry in self._zips:
                return self._zips[member.entry].open(member.inner)
            if member.entry in self._tars:
                tf, infos = self._tars[member.entry]
                return tf.extractfile(infos[member.inner])
            return open(member.entry / member.inner if member.inner else member.entry, "rb")
        except _READ_ERRORS as err:
            raise LeoInputError(f"{member}: cannot read ({err})") from None

    def read(self, member: Member) -> bytes:
        """Read one member's bytes."""
        with self.open(member) as f:
            try:
                return f.read()
            except _READ_ERRORS as err:
                raise LeoInputError(f"{member}: cannot read ({err})") from None

    def storage_order(self, members: Iterable[Member]) -> list[Member]:
        """Sort ``members`` as they are stored (tar members by offset: no backward seeks)."""

        def key(m: Member) -> tuple[str, int, str]:
            tar = self._tars.get(m.entry)
            return (str(m.entry), tar[1][m.inner].offset if tar else 0, m.inner)

        return sorted(members, key=key)

    def close(self) -> None:
        """Close the open archives."""
        for zf in self._zips.values():
            zf.close()
        for tf, _ in self._tars.values():
            tf.close()

    def __enter__(self) -> RawFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_tar_name(name: str) -> bool:
    return name.lower().endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def decode_image(data: bytes, size: tuple[int, int], channels: int, name: str) -> np.ndarray:
    """Decode one encoded image and resize it with antialiasing.

    Args:
        data: the encoded file (PNG, JPEG, ...).
        size: output ``(H, W)``.
        channels: 1 (grey, ``L``) or 3 (``RGB``).
        name: the image's name, for the error message.

    Returns:
        uint8 ``(H, W, channels)``.

    Raises:
        LeoInputError: naming the image that cannot be decoded.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            return prepare_image(img, size, channels)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise LeoInputError(f"{name}: cannot decode image ({err})") from None


def prepare_image(img: Image.Image, size: tuple[int, int], channels: int) -> np.ndarray:
    """Convert a PIL image to grey (``L``) or ``RGB`` and resize it with antialiasing.

    Args:
        img: any mode and size.
        size: output ``(H, W)``; an image already that size is not resampled.
        channels: 1 (grey) or 3 (RGB).

    Returns:
        uint8 ``(H, W, channels)``.
    """
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).reshape(size[0], size[1], channels)


def resize_many(
    images: np.ndarray,
    size: tuple[int, int],
    channels: int,
    *,
    rows: np.ndarray | None = None,
    workers: int = 1,
    desc: str = "resize",
) -> np.ndarray:
    """:func:`prepare_image` over uint8 ``(n, h, w, c)`` arrays (c = 1 or 3), into one
    uint8 ``(m, H, W, channels)`` array.

    Args:
        images: uint8 ``(n, h, w, c)``.
        size: output ``(H, W)``.
        channels: 1 or 3.
        rows: the ``m`` rows of ``images`` to take, in this order (default: all ``n``).
        workers: resizing threads (PIL releases the GIL while it resamples).
        desc: progress-bar label (the bar shows only on a terminal).
    """
    _, h, w, c = images.shape
    rows = np.arange(len(images)) if rows is None else np.asarray(rows)
    if (h, w) == tuple(size) and c == channels:
        return images[rows]
    n = len(rows)
    out = np.empty((n, size[0], size[1], channels), dtype=np.uint8)

    def one(i: int) -> None:
        arr = images[rows[i]] if c == 3 else images[rows[i], :, :, 0]
        out[i] = prepare_image(Image.fromarray(arr), size, channels)

    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=n, desc=desc, unit="img", disable=None, leave=False) as bar,
    ):
        for start in range(0, n, _BATCH):
            stop = min(n, start + _BATCH)
            list(pool.map(one, range(start, stop)))
            bar.update(stop - start)
    return out


def decode_many(
    items: Iterable[tuple[str, Callable[[], bytes]]],
    count: int,
    size: tuple[int, int],
    channels: int,
    *,
    workers: int = 1,
    desc: str = "decode",
) -> np.ndarray:
    """Decode ``count`` images into one uint8 ``(count, H, W, C)`` array, in order.

    Args:
        items: ``(name, read)`` pairs; ``read()`` returns the encoded bytes. Bytes are read
            in order on the calling thread (sequential I/O); decoding runs on ``workers``
            threads, a batch at a time.
        count: number of items.
        size: output ``(H, W)``.
        channels: 1 or 3.
        workers: decoding threads.
        desc: progress-bar label (the bar shows only on a terminal).
    """
    out = np.empty((count, size[0], size[1], channels), dtype=np.uint8)
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=count, desc=desc, unit="img", disable=None, leave=False) as bar,
    ):
        start = 0
        for batch in _batches(items, _BATCH):
            blobs = [(name, read()) for name, read in batch]
            decoded = pool.map(lambda b: decode_image(b[1], size, channels, b[0]), blobs)
            for i, arr in enumerate(decoded, start):
                out[i] = arr
            start += len(blobs)
            bar.update(len(blobs))
    if start != count:
        raise ValueError(f"expected {count} images, got {start}")
    return out


def _batches(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def check_classes(
    splits: dict[str, dict[str, int]], min_classes: int, min_images: int, source: str
) -> None:
    """Check the class lists of all splits before any image is decoded.

    Args:
        splits: split name -> {class name: number of images}.
        min_classes: ``prepare.min_classes_per_split`` (N of N-way episodes).
        min_images: ``prepare.min_images_per_class`` (K shots + queries).
        source: what the classes were read from, for messages.

    Raises:
        LeoInputError: an empty class, a class in two splits, a split with too few classes
            or a class with too few images (naming the split, the class and the counts).
    """
    seen: dict[str, str] = {}
    for split, classes in splits.items():
        for cls, n in classes.items():
            if cls in seen:
                raise LeoInputError(
                    f"{source}: class '{cls}' is in both split '{seen[cls]}' and split '{split}'"
                )
            seen[cls] = split
            if n == 0:
                raise LeoInputError(f"{source}: class '{cls}' (split '{split}') has no images")
    for split, classes in splits.items():
        if len(classes) < min_classes:
            raise LeoInputError(
                f"{source}: split '{split}' has {len(classes)} classes, fewer than "
                f"prepare.min_classes_per_split = {min_classes}"
            )
        for cls, n in classes.items():
            if n < min_images:
                raise LeoInputError(
                    f"{source}: class '{cls}' (split '{split}') has {n} images, fewer than "
                    f"prepare.min_images_per_class = {min_images}"
                )
