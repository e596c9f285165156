"""Import the published LEO embeddings (Rusu et al., ICLR 2019) into the Parquet store.

The authors published the WRN-28-10 features they trained on as
``<root>/<dataset>/<view>/<split>_embeddings.pkl`` with ``dataset`` in ``miniImageNet`` /
``tieredImageNet``, ``view`` in ``center`` / ``multiview`` (``multiview`` for miniImageNet
only) and ``split`` in ``train`` / ``val`` / ``test``. Each file is a Python 2 pickle of a dict:

- ``embeddings``: float32 ``(n, 640)``;
- ``keys``: ``n`` strings (``str`` or ``bytes``) ``<prefix>-<class>-<image>`` where
  ``<image>`` starts with ``<class>_``; the class of a row is the middle field;
- ``labels``: ``n`` class indices.

Pickles are read with ``leo.data.safe_pickle`` (no code can run) and validated strictly: the dict
has exactly those three keys (``str`` or ``bytes``); ``embeddings`` is 2-D floating point with
finite, non-zero rows (float64 is accepted and converted to float32, the published dtype;
integers are refused); the lengths agree; every key matches ``KEY_PATTERN`` with an image that
starts with ``<class>_``; keys and image names are unique (the reference code indexes rows by
image name); ``labels`` are integers (whole-number floats are converted) and one class never
has two labels; the three splits have the same width and disjoint classes. ``bytes`` keys are
decoded as latin-1, as the loader decodes Python 2 strings, so a key reads the same whichever
way it was stored. The example id of a row is its whole key.

``import_published`` writes ``train``/``val``/``test.parquet`` with ``leo.data.store``. With
``train_on_val`` (as in the reference code) the meta-training file holds the train rows
followed by the val rows; ``val.parquet`` is still the val split. All three files appear
together or not at all: they are written to temporary names and renamed only when every split
has been read, validated and written.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import numpy as np

from leo.data.safe_pickle import safe_load
from leo.data.store import check_rows, write_embeddings
from leo.utils.atomic import atomic_path
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256

DATASETS: dict[str, tuple[str, ...]] = {
    "miniImageNet": ("center", "multiview"),
    "tieredImageNet": ("center",),
}
SPLITS = ("train", "val", "test")
FIELDS = ("embeddings", "keys", "labels")
KEY_PATTERN = re.compile(r"^(?P<prefix>[^-]*)-(?P<cls>[^-]+)-(?P<image>.+)$")
SOURCE = "published LEO embeddings (Rusu et al., ICLR 2019)"


def _check_names(dataset: str, view: str, split: str | None = None) -> None:
    if dataset not in DATASETS:
        raise LeoInputError(f"unknown dataset {dataset!r}; expected one of {sorted(DATASETS)}")
    if view not in DATASETS[dataset]:
        raise LeoInputError(
            f"unknown view {view!r} for {dataset}; expected one of {list(DATASETS[dataset])}"
        )
    if split is not None and split not in SPLITS:
        raise LeoInputError(f"unknown split {split!r}; expected one of {list(SPLITS)}")


def published_relpath(dataset: str, view: str, split: str) -> str:
    """``<dataset>/<view>/<split>_embeddings.pkl``: the file's path under the root."""
    _check_names(dataset, view, split)
    return f"{dataset}/{view}/{split}_embeddings.pkl"


def _as_text(value: object) -> str | None:
    if isinstance(value, bytes):
        return value.decode("latin1")
    return str(value) if isinstance(value, str) else None


def _validate(path: Path, obj: object) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check one unpickled file; return (embeddings (n, D) float32, classes (n,), keys (n,))."""
    if not isinstance(obj, dict):
        raise LeoInputError(f"{path}: expected a dict, got {type(obj).__name__}")
    data: dict[str, object] = {}
    for k, v in obj.items():
        name = _as_text(k)
        if name not in FIELDS or name in data:
            raise LeoInputError(
                f"{path}: unexpected or repeated dict key {k!r}; expected exactly {list(FIELDS)}"
            )
        data[name] = v
    missing = [f for f in FIELDS if f not in data]
    if missing:
        raise LeoInputError(f"{path}: missing dict key {missing[0]!r}")

    emb = data["embeddings"]
    if not isinstance(emb, np.ndarray) or emb.ndim != 2 or emb.dtype.kind != "f":
        desc = f"{emb.dtype} {emb.shape}" if isinstance(emb, np.ndarray) else type(emb).__name__
        raise LeoInputError(f"{path}: 'embeddings' must be a 2-D float array, got {desc}")
    n, dim = emb.shape
    if n == 0 or dim == 0:
        raise LeoInputError(f"{path}: 'embeddings' is empty, shape {emb.shape}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)

    raw_keys = data["keys"]
    if isinstance(raw_keys, np.ndarray) and raw_keys.ndim != 1:
        raise LeoInputError(f"{path}: 'keys' must be 1-D, got shape {raw_keys.shape}")
    if not isinstance(raw_keys, np.ndarray | list | tuple) or len(raw_keys) != n:
        size = len(raw_keys) if isinstance(raw_keys, np.ndarray | list | tuple) else "no"
        raise LeoInputError(f"{path}: 'keys' must hold {n} strings (one per row), got {size}")
    labels = np.asarray(data["labels"])
    if labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels)):
        labels = labels.astype(np.int64)  # whole-number floats are indices too
    if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != n:
        raise LeoInputError(
            f"{path}: 'labels' must be {n} integers (one per row), got {labels.dtype} "
            f"{labels.shape}"
        )

    keys, classes, images = [], [], []
    for i, raw in enumerate(raw_keys):
        key = _as_text(raw)
        match = KEY_PATTERN.match(key) if key is not None else None
        if match is None:
            shown = bytes(raw) if isinstance(raw, bytes) else str(raw)
            raise LeoInputError(
                f"{path}: keys[{i}] = {shown!r} is not of the form '<prefix>-<class>-<image>'"
            )
        cls, image = match["cls"], match["image"]
        if not image.startswith(cls + "_"):
            raise LeoInputError(
                f"{path}: keys[{i}] = {key!r}: image {image!r} does not start with "
                f"its class {cls + '_'!r}"
            )
        keys.append(key)
        classes.append(cls)
        images.append(image)
    keys_arr = np.array(keys, dtype=np.str_)
    classes_arr = np.array(classes, dtype=np.str_)
    for what, values in (("key", keys_arr), ("image", np.array(images, dtype=np.str_))):
        _, first, counts = np.unique(values, return_index=True, return_counts=True)
        if np.any(counts > 1):
            dup_first = first[counts > 1].min()
            again = np.flatnonzero(values == values[dup_first])[1]
            raise LeoInputError(
                f"{path}: keys[{again}] = {keys[again]!r} repeats the {what} of keys[{dup_first}]"
            )

    check_rows(f"{path}: 'embeddings'", emb, keys_arr)
    _, first, inverse = np.unique(classes_arr, return_index=True, return_inverse=True)
    expected = labels[first][inverse.reshape(-1)]
    bad = np.flatnonzero(labels != expected)
    if bad.size:
        i = int(bad[0])
        j = int(first[inverse.reshape(-1)[i]])
        raise LeoInputError(
            f"{path}: keys[{i}] = {keys[i]!r} has label {labels[i]} but keys[{j}] of the same "
            f"class {classes[i]!r} has label {labels[j]}"
        )
    return emb, classes_arr, keys_arr


def read_published_split(
    root: str | os.PathLike, dataset: str, view: str, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate one published file.

    Args:
        root: the directory holding ``miniImageNet/`` and ``tieredImageNet/``.
        dataset: ``miniImageNet`` or ``tieredImageNet``.
        view: ``center`` or ``multiview`` (miniImageNet only).
        split: ``train``, ``val`` or ``test``.

    Returns:
        ``(embeddings, classes, example_ids)``: float32 ``(n, D)``, str ``(n,)`` class names,
        str ``(n,)`` keys; rows in file order.

    Raises:
        LeoInputError: bad names, a missing file, a refused pickle or any failed check; the
            message names the file and the first bad key or index.
    """
    path = Path(root) / published_relpath(dataset, view, split)
    if not path.is_file():
        raise LeoInputError(f"{path}: no such file")
    return _validate(path, safe_load(path))


def _expected_hashes(
    expected: dict[str, str] | None, relpaths: dict[str, str], root: Path
) -> dict[str, str]:
    """Map split -> expected sha256, looked up by relative path, else by split name."""
    if expected is None:
        return {}
    out = {}
    for split, rel in relpaths.items():
        want = expected.get(rel, expected.get(split))
        if want is None:
            raise LeoInputError(
                f"{root / rel}: expected_sha256 has no entry for {rel!r} (or {split!r}); give "
                "one for every file or none"
            )
        out[split] = str(want).lower()
    return out


def import_published(
    root: str | os.PathLike,
    dataset: str,
    view: str,
    out_dir: str | os.PathLike,
    *,
    train_on_val: bool = False,
    expected_sha256: dict[str, str] | None = None,
) -> dict[str, Path]:
    """Convert one dataset/view of the published embeddings to ``out_dir/{split}.parquet``.

    Args:
        root: the directory holding ``miniImageNet/`` and ``tieredImageNet/``.
        dataset: ``miniImageNet`` or ``tieredImageNet``.
        view: ``center`` or ``multiview`` (miniImageNet only).
        out_dir: where ``train.parquet``, ``val.parquet`` and ``test.parquet`` go.
        train_on_val: meta-train on train + val classes (``train.parquet`` gets the val rows
            too; ``val.parquet`` is unchanged).
        expected_sha256: hex digests keyed by path under ``root``
            (``miniImageNet/center/train_embeddings.pkl``) or by split name; if given, every
            file must have one and match it, checked before the file is unpickled.

    Returns:
        ``{split: path}`` of the three files written.

    Raises:
        LeoInputError: any bad name, file, hash or content; nothing is left in ``out_dir``.
    """
    _check_names(dataset, view)
    root, out_dir = Path(root), Path(out_dir)
    relpaths = {s: published_relpath(dataset, view, s) for s in SPLITS}
    for rel in relpaths.values():
        if not (root / rel).is_file():
            raise LeoInputError(f"{root / rel}: no such file")
    expected = _expected_hashes(expected_sha256, relpaths, root)
    hashes = {}
    for split, rel in relpaths.items():
        hashes[split] = file_sha256(root / rel)
        if split in expected and expected[split] != hashes[split]:
            raise LeoInputError(
                f"{root / rel}: sha256 {hashes[split]} does not match the expected "
                f"{expected[split]}"
            )

    def provenance(split: str, sources: list[str]) -> dict:
        return {
            "source": SOURCE,
            "dataset": dataset,
            "view": view,
            "split": split,
            "train_on_val": train_on_val,
            "files": [{"path": relpaths[s], "sha256": hashes[s]} for s in sources],
        }

    created = [d for d in (out_dir, *out_dir.parents) if not d.exists()]  # innermost first
    outputs = {s: out_dir / f"{s}.parquet" for s in SPLITS}
    seen: dict[str, tuple[set[str], int]] = {}  # split -> (classes, dim)
    try:
        with contextlib.ExitStack() as stack:
            val = None
            for split in ("val", "train", "test"):  # val first: train_on_val appends it
                emb, classes, ids = read_published_split(root, dataset, view, split)
                class_set = set(classes.tolist())
                _check_against(root / relpaths[split], class_set, emb.shape[1], seen)
                seen[split] = (class_set, emb.shape[1])
                sources = [split]
                if split == "val" and train_on_val:
                    val = (emb, classes, ids)
                if split == "train" and train_on_val:
                    emb = np.concatenate([emb, val[0]])
                    classes = np.concatenate([classes, val[1]])
                    ids = np.concatenate([ids, val[2]])
                    sources, val = ["train", "val"], None
                tmp = stack.enter_context(atomic_path(outputs[split]))
                write_embeddings(
                    tmp,
                    split=split,
                    class_names=classes,
                    example_ids=ids,
                    embeddings=emb,
                    provenance=provenance(split, sources),
                )
                del emb, classes, ids
    except BaseException:
        for d in created:  # remove the directories this call made, if still empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    return outputs


def _check_against(
    path: Path, classes: set[str], dim: int, seen: dict[str, tuple[set[str], int]]
) -> None:
    """Refuse a split whose width differs from, or whose classes overlap, an earlier split's."""
    for other, (other_classes, other_dim) in seen.items():
        if dim != other_dim:
            raise LeoInputError(f"{path}: embeddings have width {dim} but {other} has {other_dim}")
        shared = sorted(classes & other_classes)
        if shared:
            raise LeoInputError(
                f"{path}: class {shared[0]!r} is also in the {other} split "
                f"({len(shared)} shared classes); splits must have disjoint classes"
            )
