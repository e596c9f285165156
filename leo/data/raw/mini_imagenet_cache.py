"""miniImageNet as the learn2learn / torchmeta pickles, read without running code.

Raw layout, as files, a folder or a zip/tar archive under ``data/raw``: for each split in
train/val/test (64/16/20 classes, the Ravi & Larochelle split), ``mini-imagenet-cache-<split>.pkl``
holding a dict with

- ``image_data``: uint8 ``(n, 84, 84, 3)``, the split's images (RGB, already 84x84);
- ``class_dict``: wnid -> list of row indices into ``image_data`` (600 per class).

Every pickle goes through :func:`leo.data.safe_pickle.safe_load` (dicts, lists, ints,
strings and numpy arrays only). The three pickles are loaded and checked (keys, dtype and
shape, indices in range and listed once, every row labelled) before anything is resized, so
the peak memory is the three image arrays (about 1.3 GB) plus the resized output. Images are
resized with antialiasing to ``prepare.miniImageNet.image_size`` (80x80 RGB as in the
paper) by the same function as the CSV + JPEG format (:func:`leo.data.raw.images.prepare_image`).
Within a split, classes are sorted by wnid and a class's rows keep their ``class_dict`` order;
example ids are ``<split>_<row in image_data>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leo.data.prepared import SPLITS, PreparedSplit
from leo.data.raw.images import Member, RawFiles, check_classes, resize_many
from leo.data.safe_pickle import safe_load
from leo.utils.errors import LeoInputError

CACHE_NAME = "mini-imagenet-cache-{split}.pkl"
IMAGE_SHAPE = (84, 84, 3)


def has_cache(raw: RawFiles) -> bool:
    """Whether the raw files hold any ``mini-imagenet-cache-<split>.pkl``."""
    return any(raw.find(CACHE_NAME.format(split=s)) for s in SPLITS)


def field(obj: dict, key: str, member: Member | str) -> Any:
    """``obj[key]``, the key as ``str`` or as ``bytes`` (pickles written by Python 3 with
    bytes keys); a missing key is refused naming the file and the key."""
    for k in (key, key.encode()):
        if k in obj:
            return obj[k]
    raise LeoInputError(f"{member}: missing key '{key}'")


def as_name(value: Any, member: Member | str, key: str) -> str:
    """A class name stored as ``str`` or ``bytes``."""
    if isinstance(value, bytes):
        return value.decode("latin1")
    if isinstance(value, str):
        return value
    raise LeoInputError(f"{member}: key '{key}': class names must be strings, got {value!r}")


def as_indices(value: Any, member: Member | str, key: str) -> np.ndarray:
    """A list (or 1-D array) of integers as int64 ``(m,)``."""
    if isinstance(value, list | tuple):
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value):
            raise LeoInputError(f"{member}: key '{key}': expected a list of integers")
        return np.asarray(value, dtype=np.int64).reshape(len(value))
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        return value.astype(np.int64)
    raise LeoInputError(
        f"{member}: key '{key}': expected a list of integers, got {type(value).__name__}"
    )


def read_cache(raw: RawFiles, split: str) -> tuple[np.ndarray, dict[str, np.ndarray], Member]:
    """Load and check ``mini-imagenet-cache-<split>.pkl``.

    Returns:
        ``(image_data uint8 (n, 84, 84, 3), {wnid: int64 row indices}, member)``.

    Raises:
        LeoInputError: a missing or refused pickle, not a dict, a missing key, image data of
            another dtype or shape, a class list that is not integers, an index out of range
            or listed twice, rows that no class lists.
    """
    member = raw.find_one(CACHE_NAME.format(split=split))
    with raw.open(member) as f:
        obj = safe_load(f, name=str(member))
    if not isinstance(obj, dict):
        raise LeoInputError(
            f"{member}: expected a dict with keys 'image_data' and 'class_dict', "
            f"got {type(obj).__name__}"
        )
    images = field(obj, "image_data", member)
    if not isinstance(images, np.ndarray):
        raise LeoInputError(
            f"{member}: key 'image_data': expected a uint8 array, got {type(images).__name__}"
        )
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != IMAGE_SHAPE:
        raise LeoInputError(
            f"{member}: key 'image_data': expected uint8 (n, 84, 84, 3), got "
            f"{images.dtype} {images.shape}"
        )
    class_dict = field(obj, "class_dict", member)
    if not isinstance(class_dict, dict):
        raise LeoInputError(
            f"{member}: key 'class_dict': expected a dict of class -> row indices, got "
            f"{type(class_dict).__name__}"
        )
    n = len(images)
    owner = np.full(n, -1, dtype=np.int64)
    classes: dict[str, np.ndarray] = {}
    for i, (raw_name, raw_rows) in enumerate(class_dict.items()):
        name = as_name(raw_name, member, "class_dict")
        key = f"class_dict.{name}"
        if name in classes:
            raise LeoInputError(f"{member}: key 'class_dict': class '{name}' appears twice")
        rows = as_indices(raw_rows, member, key)
        bad = rows[(rows < 0) | (rows >= n)]
        if len(bad):
            raise LeoInputError(
                f"{member}: key '{key}': row {int(bad[0])} is outside 0..{n - 1} "
                f"(the rows of 'image_data')"
            )
        unique, counts = np.unique(rows, return_counts=True)
        if (counts > 1).any():
            raise LeoInputError(
                f"{member}: key '{key}': row {int(unique[counts > 1][0])} is listed twice"
            )
        taken = owner[rows] >= 0
        if taken.any():
            row = int(rows[taken][0])
            other = list(classes)[int(owner[row])]
            raise LeoInputError(
                f"{member}: key '{key}': row {row} is also listed under class '{other}'"
            )
        owner[rows] = i
        classes[name] = rows
    unlabelled = np.flatnonzero(owner < 0)
    if len(unlabelled):
        raise LeoInputError(
            f"{member}: key 'class_dict': {len(unlabelled)} rows of 'image_data' are in no "
            f"class (the first: row {int(unlabelled[0])})"
        )
    return images, classes, member


def read_mini_imagenet_cache(
    raw: RawFiles,
    *,
    image_size: tuple[int, int] = (80, 80),
    channels: int = 3,
    min_classes: int = 5,
    min_images: int = 20,
    workers: int = 1,
) -> tuple[dict[str, PreparedSplit], dict]:
    """Read the three ``mini-imagenet-cache-<split>.pkl`` into prepared splits.

    Args:
        raw: the raw files.
        image_size: output ``(H, W)``, 80x80 by default.
        channels: 3 (RGB, default) or 1.
        min_classes, min_images: minimum classes per split and images per class.
        workers: resizing threads.

    Returns:
        ``({split: PreparedSplit}, manifest metadata)``; the metadata names the format and
        the pickle of each split.

    Raises:
        LeoInputError: see :func:`read_cache`; an empty class, a class in two splits, too few
            classes or images.
    """
    loaded = {split: read_cache(raw, split) for split in SPLITS}
    counts = {
        split: {name: len(rows) for name, rows in classes.items()}
        for split, (_, classes, _) in loaded.items()
    }
    check_classes(counts, min_classes, min_images, source="miniImageNet (pickles)")
    splits = {}
    files = {}
    for split in SPLITS:
        images, classes, member = loaded.pop(split)
        files[split] = str(member)
        names = sorted(classes)
        order = np.concatenate([classes[c] for c in names])
        labels = np.repeat(np.arange(len(names), dtype=np.int64), [len(classes[c]) for c in names])
        resized = resize_many(
            images, image_size, channels, rows=order, workers=workers, desc=f"miniImageNet {split}"
        )
        del images
        splits[split] = PreparedSplit(
            images=resized,
            labels=labels,
            classes=names,
            ids=np.array([f"{split}_{int(r):06d}" for r in order], dtype=str),
        )
    return splits, {"format": "mini-imagenet-cache", "cache_files": files}
