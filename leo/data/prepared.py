"""The prepared-image format shared by the `prepare`, `pretrain` and `embed` stages.

A prepared dataset is a directory with:

- ``manifest.json``: ``{"dataset": str, "image_size": [H, W], "channels": C,
  "splits": {split: {"classes": [name, ...], "num_images": n}}, ...provenance}``;
- ``<split>.npz`` for each split in ``("train", "val", "test")`` with arrays
  ``images`` uint8 ``(n, H, W, C)``, ``labels`` int64 ``(n,)`` (indices into that split's
  ``classes`` list) and ``ids`` unicode ``(n,)`` (stable example ids, unique in the split).

Arrays are stored uncompressed so they load with ``allow_pickle=False`` and no copy-heavy
decompression; the files' bytes depend only on the arrays (:func:`leo.utils.arrays.write_npz`).
Writes are atomic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from leo.utils.arrays import write_npz
from leo.utils.atomic import write_json
from leo.utils.errors import LeoInputError

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"


@dataclass
class PreparedSplit:
    """One split of a prepared dataset.

    Attributes:
        images: uint8 ``(n, H, W, C)``.
        labels: int64 ``(n,)``, indices into ``classes``.
        classes: class names, in label order.
        ids: unicode ``(n,)`` example ids.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    ids: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (n, H, W, C), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (n,) or self.ids.shape != (n,):
            raise ValueError("labels and ids must have one entry per image")


def save_prepared(out_dir: str | Path, splits: dict[str, PreparedSplit], meta: dict) -> None:
    """Write every split and then the manifest (the manifest last, so its presence means done)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = dict(meta)
    first = next(iter(splits.values()))
    manifest["image_size"] = list(first.images.shape[1:3])
    manifest["channels"] = int(first.images.shape[3])
    manifest["splits"] = {}
    for name, split in splits.items():
        write_npz(
            out_dir / f"{name}.npz",
            images=split.images,
            labels=split.labels.astype(np.int64),
            ids=split.ids.astype(str),
        )
        manifest["splits"][name] = {"classes": list(split.classes), "num_images": len(split.images)}
    write_json(out_dir / MANIFEST, manifest)


def load_manifest(root: str | Path) -> dict:
    """Read ``manifest.json`` of a prepared dataset, with a clear error when it is missing."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise LeoInputError(f"{path}: no prepared dataset here (run the prepare stage first)")
    return json.loads(path.read_text())


def load_prepared_split(root: str | Path, split: str) -> PreparedSplit:
    """Load one split written by :func:`save_prepared`."""
    manifest = load_manifest(root)
    if split not in manifest["splits"]:
        raise LeoInputError(f"{Path(root) / MANIFEST}: no split {split!r}")
    path = Path(root) / f"{split}.npz"
    with np.load(path, allow_pickle=False) as z:
        return PreparedSplit(
            images=z["images"],
            labels=z["labels"],
            classes=list(manifest["splits"][split]["classes"]),
            ids=z["ids"],
        )


def read_split_file(path: str | Path) -> tuple[dict, bytes]:
    """A versioned split file (``leo/data/splits/*.json``): its JSON object, holding a
    ``splits`` mapping, and its bytes (for the manifest's sha256).

    Raises:
        LeoInputError: a missing file, bad JSON, or no ``splits`` mapping, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: split file not found")
    data = path.read_bytes()
    try:
        spec = json.loads(data)
    except ValueError as err:
        raise LeoInputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("splits"), dict):
        raise LeoInputError(f"{path}: missing or malformed key 'splits'")
    return spec, data
