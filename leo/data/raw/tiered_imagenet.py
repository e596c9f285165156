"""tieredImageNet (Ren et al., 2018) from its pickle distribution, read without running code.

Raw layout, as files, a folder or a zip/tar archive under ``data/raw``, for each split in
train/val/test (351/97/160 classes):

- ``<split>_images_png.pkl``: a list (or array) of PNG-encoded 84x84 images, each a 1-D
  uint8 numpy array;
- ``<split>_labels.pkl``: a dict with ``label_specific`` (int array, one class index per
  image), ``label_specific_str`` (class names, indexed by ``label_specific``),
  ``label_general`` and ``label_general_str`` (the 34 super-categories; not used here).

Every pickle goes through :func:`leo.data.safe_pickle.safe_load`, which admits only containers,
strings, numbers and arrays. The labels of all splits are checked before any image pickle is
read. Images are resized to 80x80 RGB; example ids are ``<split>_<index in the pickle>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from leo.data.prepared import SPLITS, PreparedSplit
from leo.data.raw.images import Member, RawFiles, check_classes, decode_many
from leo.data.safe_pickle import safe_load
from leo.utils.errors import LeoInputError


def _load(raw: RawFiles, member: Member) -> Any:
    with raw.open(member) as f:
        return safe_load(f, name=str(member))


def _field(labels: dict, key: str, member: Member) -> Any:
    for k in (key, key.encode()):
        if k in labels:
            return labels[k]
    raise LeoInputError(f"{member}: missing key '{key}'")


def read_labels(raw: RawFiles, split: str) -> tuple[np.ndarray, list[str]]:
    """Read ``<split>_labels.pkl``: per-image class indices and the class names.

    Raises:
        LeoInputError: not a dict, a missing key, labels that are not integers in range.
    """
    member = raw.find_one(f"{split}_labels.pkl")
    labels = _load(raw, member)
    if not isinstance(labels, dict):
        raise LeoInputError(f"{member}: expected a dict, got {type(labels).__name__}")
    specific = np.asarray(_field(labels, "label_specific", member))
    names = [
        n.decode("latin1") if isinstance(n, bytes) else n
        for n in _field(labels, "label_specific_str", member)
    ]
    if specific.ndim != 1 or specific.dtype.kind not in "iu":
        raise LeoInputError(
            f"{member}: 'label_specific' must be a 1-D integer array, got "
            f"{specific.dtype} {specific.shape}"
        )
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise LeoInputError(f"{member}: 'label_specific_str' must be distinct strings")
    if len(specific) and (specific.min() < 0 or specific.max() >= len(names)):
        raise LeoInputError(
            f"{member}: 'label_specific' has values outside 0..{len(names) - 1} "
            f"(the range of 'label_specific_str')"
        )
    return specific.astype(np.int64), names


def read_images(raw: RawFiles, split: str, count: int) -> list:
    """Read ``<split>_images_png.pkl``: ``count`` encoded images.

    Raises:
        LeoInputError: not a list/array, a length other than the labels', an element that is
            not a 1-D uint8 array or bytes.
    """
    member = raw.find_one(f"{split}_images_png.pkl")
    images = _load(raw, member)
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2:
        images = list(images)  # equal-length encodings stacked into one array
    if not isinstance(images, list | tuple):
        raise LeoInputError(f"{member}: expected a list of PNG arrays, got {type(images).__name__}")
    if len(images) != count:
        raise LeoInputError(
            f"{member}: {len(images)} images, but {split}_labels.pkl has {count} labels"
        )
    for i, item in enumerate(images):
        ok_array = isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1
        if not (ok_array or isinstance(item, bytes)):
            raise LeoInputError(f"{member}: image {i} is not a 1-D uint8 array of PNG bytes")
    return images


def read_tiered_imagenet(
    raw: RawFiles,
    *,
    image_size: tuple[int, int] = (80, 80),
    channels: int = 3,
    min_classes: int = 5,
    min_images: int = 20,
    workers: int = 1,
) -> tuple[dict[str, PreparedSplit], dict]:
    """Read tieredImageNet's pickles into prepared splits.

    Args:
        raw: the raw files.
        image_size: output ``(H, W)``, 80x80 by default.
        channels: 3 (RGB, default) or 1.
        min_classes, min_images: minimum classes per split and images per class.
        workers: decoding threads.

    Returns:
        ``({split: PreparedSplit}, manifest metadata)``.

    Raises:
        LeoInputError: a missing or refused pickle, malformed labels, an empty class, a class
            in two splits, too few classes or images, an undecodable image.
    """
    labels = {split: read_labels(raw, split) for split in SPLITS}
    counts = {
        split: dict(zip(names, np.bincount(lab, minlength=len(names)).tolist(), strict=True))
        for split, (lab, names) in labels.items()
    }
    check_classes(counts, min_classes, min_images, source="tieredImageNet")
    splits = {}
    for split in SPLITS:
        lab, names = labels[split]
        images = read_images(raw, split, len(lab))
        name = f"{split}_images_png.pkl"
        arrays = decode_many(
            ((f"{name}[{i}]", lambda b=b: bytes(b)) for i, b in enumerate(images)),
            len(images),
            image_size,
            channels,
            workers=workers,
            desc=f"tieredImageNet {split}",
        )
        del images
        splits[split] = PreparedSplit(
            images=arrays,
            labels=lab,
            classes=names,
            ids=np.array([f"{split}_{i:06d}" for i in range(len(lab))], dtype=str),
        )
    return splits, {}
