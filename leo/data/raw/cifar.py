"""CIFAR-FS and FC100: few-shot splits of CIFAR-100, read from its python archive.

Raw layout: ``cifar-100-python.tar.gz`` (the file torchvision and Keras download from
https://www.cs.toronto.edu/~kriz/), read in place, or its three members as files or in a
folder: ``cifar-100-python/{train,test,meta}``, Python 2 pickles of dicts:

- ``train`` / ``test``: ``data`` uint8 ``(n, 3072)`` (each row 1024 red, 1024 green, 1024 blue
  values of a 32x32 image, row-major), ``fine_labels`` and ``coarse_labels`` (lists of n
  ints), plus ``filenames`` and ``batch_label`` (not used); 50,000 and 10,000 images;
- ``meta``: ``fine_label_names`` (100 class names) and ``coarse_label_names`` (20 superclass
  names), indexed by the labels.

Every pickle goes through :func:`leo.data.safe_pickle.safe_load` (dicts, lists, ints, strings
and numpy arrays only); keys may be ``str`` (Python 2 pickles) or ``bytes``. A class's
images are all of its rows in ``train`` then in ``test`` (600 per class). The split is a
versioned JSON file (``leo/data/splits/cifar_fs.json``, ``fc100.json``)::

    {"name": str, "version": int, "description": str, "source": str (the citation),
     "by": "class" | "superclass",
     "splits": {"train": [name, ...], "val": [...], "test": [...]},
     "classes": {superclass: [class, ...], ...}}   # optional; checked against the labels

With ``"by": "class"`` (CIFAR-FS) the split lists fine class names; with ``"superclass"``
(FC100) it lists superclass names and a split holds every class of its superclasses. Images
stay 32x32 RGB unless ``prepare.<dataset>.image_size`` / ``channels`` say otherwise (resized
with antialiasing by :func:`leo.data.raw.images.prepare_image`). Example ids are
``<file>_<row>``, e.g. ``train_00042``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from leo.data.prepared import SPLITS, PreparedSplit, read_split_file
from leo.data.raw.images import Member, RawFiles, check_classes, resize_many
from leo.data.raw.mini_imagenet_cache import as_name, field
from leo.data.safe_pickle import safe_load
from leo.utils.errors import LeoInputError

SOURCES = ("train", "test")  # the archive's files, both used
SIDE = 32


@dataclass(frozen=True)
class ClassSplit:
    """A parsed CIFAR split file.

    Attributes:
        path: the file; sha256: its sha256 (recorded in the manifest).
        name, version, source: as declared.
        by: ``"class"`` or ``"superclass"``.
        splits: split -> class or superclass names.
        classes: superclass -> its classes (may be empty).
    """

    path: Path
    sha256: str
    name: str
    version: int
    source: str
    by: str
    splits: dict[str, list[str]]
    classes: dict[str, list[str]]


def _names(value: Any, path: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise LeoInputError(f"{path}: key '{key}' must be a list of names")
    if len(set(value)) != len(value):
        raise LeoInputError(f"{path}: key '{key}' lists a name twice")
    return list(value)


def load_class_split(path: str | Path) -> ClassSplit:
    """Read and validate a CIFAR split file.

    Raises:
        LeoInputError: missing file, bad JSON, a missing or malformed key, a name in two
            splits.
    """
    path = Path(path)
    spec, data = read_split_file(path)
    if spec.get("by") not in ("class", "superclass"):
        raise LeoInputError(f"{path}: key 'by' must be 'class' or 'superclass'")
    if not isinstance(spec.get("source"), str) or not spec["source"].strip():
        raise LeoInputError(f"{path}: key 'source' must cite where the split comes from")
    extra = set(spec["splits"]) - set(SPLITS)
    if extra:
        raise LeoInputError(f"{path}: unknown split(s) {sorted(extra)} under 'splits'")
    splits: dict[str, list[str]] = {}
    owner: dict[str, str] = {}
    for split in SPLITS:
        splits[split] = _names(spec["splits"].get(split), path, f"splits.{split}")
        for name in splits[split]:
            if name in owner:
                raise LeoInputError(
                    f"{path}: '{name}' is in both split '{owner[name]}' and split '{split}'"
                )
            owner[name] = split
    classes = spec.get("classes", {})
    if not isinstance(classes, dict):
        raise LeoInputError(f"{path}: key 'classes' must map superclasses to class lists")
    classes = {k: _names(v, path, f"classes.{k}") for k, v in classes.items()}
    return ClassSplit(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        name=str(spec.get("name", path.stem)),
        version=int(spec.get("version", 0)),
        source=spec["source"],
        by=spec["by"],
        splits=splits,
        classes=classes,
    )


def _load_dict(raw: RawFiles, basename: str) -> tuple[dict, Member]:
    member = raw.find_one(basename)
    with raw.open(member) as f:
        obj = safe_load(f, name=str(member))
    if not isinstance(obj, dict):
        raise LeoInputError(f"{member}: expected a dict, got {type(obj).__name__}")
    return obj, member


def read_meta(raw: RawFiles) -> tuple[list[str], list[str]]:
    """``meta``: the 100 class names and the 20 superclass names, in label order.

    Raises:
        LeoInputError: a missing key, names that are not distinct strings.
    """
    meta, member = _load_dict(raw, "meta")
    out = []
    for key in ("fine_label_names", "coarse_label_names"):
        value = field(meta, key, member)
        if not isinstance(value, list | tuple):
            raise LeoInputError(f"{member}: key '{key}': expected a list of names")
        names = [as_name(v, member, key) for v in value]
        if len(set(names)) != len(names) or not all(names):
            raise LeoInputError(f"{member}: key '{key}': names must be distinct and non-empty")
        out.append(names)
    return out[0], out[1]


def _labels(obj: dict, key: str, member: Member, n: int, limit: int) -> np.ndarray:
    value = field(obj, key, member)
    ok = isinstance(value, list | tuple) and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in value
    )
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu":
        ok, value = True, value.tolist()
    if not ok:
        raise LeoInputError(f"{member}: key '{key}': expected a list of integers")
    labels = np.asarray(value, dtype=np.int64).reshape(len(value))
    if len(labels) != n:
        raise LeoInputError(f"{member}: key '{key}': {len(labels)} labels for {n} images")
    if n and (labels.min() < 0 or labels.max() >= limit):
        raise LeoInputError(
            f"{member}: key '{key}': labels outside 0..{limit - 1} (the names in meta)"
        )
    return labels


def read_source(raw: RawFiles, name: str, num_fine: int, num_coarse: int) -> dict[str, Any]:
    """``train`` or ``test``: images uint8 ``(n, 32, 32, 3)``, fine and coarse labels.

    Raises:
        LeoInputError: a missing key, ``data`` not uint8 ``(n, 3072)``, label lists of
            another length or out of range.
    """
    obj, member = _load_dict(raw, name)
    data = field(obj, "data", member)
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3 * SIDE * SIDE
    ):
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise LeoInputError(f"{member}: key 'data': expected uint8 (n, 3072), got {got}")
    n = len(data)
    return {
        "member": member,
        "images": data.reshape(n, 3, SIDE, SIDE).transpose(0, 2, 3, 1),
        "fine": _labels(obj, "fine_labels", member, n, num_fine),
        "coarse": _labels(obj, "coarse_labels", member, n, num_coarse),
    }


def read_cifar(
    raw: RawFiles,
    split_file: str | Path,
    *,
    image_size: tuple[int, int] = (SIDE, SIDE),
    channels: int = 3,
    min_classes: int = 5,
    min_images: int = 20,
    workers: int = 1,
) -> tuple[dict[str, PreparedSplit], dict]:
    """Read CIFAR-100's python archive into the prepared splits of ``split_file``.

    Args:
        raw: the raw files.
        split_file: ``leo/data/splits/cifar_fs.json`` (CIFAR-FS), ``fc100.json`` (FC100) or
            another file of the same format.
        image_size: output ``(H, W)``; 32x32 (no resampling) by default.
        channels: 3 (RGB, default) or 1.
        min_classes, min_images: minimum classes per split and images per class.
        workers: resizing threads.

    Returns:
        ``({split: PreparedSplit}, manifest metadata)``; the metadata records the split file,
        its sha256, name, version and source, and the classes no split uses.

    Raises:
        LeoInputError: see :func:`read_meta`, :func:`read_source`; a class whose images carry
            two superclasses, a split-file name that is not in the archive, a superclass whose
            classes differ from the split file's ``classes``, an empty class, a class in two
            splits, too few classes or images.
    """
    spec = load_class_split(split_file)
    fine_names, coarse_names = read_meta(raw)
    sources = {name: read_source(raw, name, len(fine_names), len(coarse_names)) for name in SOURCES}
    fine = np.concatenate([s["fine"] for s in sources.values()])
    coarse = np.concatenate([s["coarse"] for s in sources.values()])
    parent = np.full(len(fine_names), -1, dtype=np.int64)
    for f, c in zip(fine.tolist(), coarse.tolist(), strict=True):
        if parent[f] < 0:
            parent[f] = c
        elif parent[f] != c:
            raise LeoInputError(
                f"{sources['train']['member']}: class '{fine_names[f]}' has images labelled with "
                f"two superclasses ('{coarse_names[parent[f]]}' and '{coarse_names[c]}')"
            )
    members = {
        coarse_names[c]: sorted(fine_names[f] for f in np.flatnonzero(parent == c))
        for c in range(len(coarse_names))
    }
    for superclass, expected in spec.classes.items():
        if superclass not in members:
            raise LeoInputError(f"{spec.path}: superclass '{superclass}' is not in the archive")
        if sorted(expected) != members[superclass]:
            raise LeoInputError(
                f"{spec.path}: key 'classes.{superclass}' lists {sorted(expected)}, the archive "
                f"labels {members[superclass]} with it"
            )
    known = set(fine_names) if spec.by == "class" else set(coarse_names)
    split_classes: dict[str, list[str]] = {}
    for split, names in spec.splits.items():
        for name in names:
            if name not in known:
                raise LeoInputError(
                    f"{spec.path}: {spec.by} '{name}' (split '{split}') is not in the archive"
                )
        chosen = names if spec.by == "class" else [f for s in names for f in members[s]]
        split_classes[split] = sorted(chosen)
    index = {name: i for i, name in enumerate(fine_names)}
    per_class = np.bincount(fine, minlength=len(fine_names))
    counts = {
        split: {c: int(per_class[index[c]]) for c in classes}
        for split, classes in split_classes.items()
    }
    check_classes(counts, min_classes, min_images, source=f"CIFAR-100 ({spec.path.name})")

    images = np.concatenate([s["images"] for s in sources.values()])
    ids = np.array(
        [f"{name}_{i:05d}" for name, s in sources.items() for i in range(len(s["fine"]))]
    )
    splits = {}
    for split, classes in split_classes.items():
        labels_of = np.array([index[c] for c in classes])
        rows = np.concatenate([np.flatnonzero(fine == f) for f in labels_of])
        splits[split] = PreparedSplit(
            images=resize_many(
                images, image_size, channels, rows=rows, workers=workers, desc=spec.name
            ),
            labels=np.repeat(np.arange(len(classes), dtype=np.int64), per_class[labels_of]),
            classes=classes,
            ids=ids[rows],
        )
    used = {c for classes in split_classes.values() for c in classes}
    meta = {
        "split_file": spec.path.as_posix(),
        "split_file_sha256": spec.sha256,
        "split_name": spec.name,
        "split_version": spec.version,
        "split_source": spec.source,
        "unused_classes": sorted(set(fine_names) - used),
    }
    return splits, meta
