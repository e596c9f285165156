"""The Parquet embedding store: one file per split, one row per example.

Schema (version "1"):

=============  ==============================  ==========================================
column         Arrow type                      meaning
=============  ==============================  ==========================================
``split``      ``string``                      the split name, the same on every row
``class``      ``string``                      the class name (non-empty)
``example_id`` ``string``                      a stable example id, unique within the file
``embedding``  ``fixed_size_list<float32>[D]`` the raw (un-normalised) embedding
=============  ==============================  ==========================================

No column may hold nulls and embeddings must be finite and non-zero. Rows are grouped by
class (classes in order of first appearance in the writer's input, rows of a class in input
order). File-level key-value metadata:

- ``leo.schema_version``: ``"1"``;
- ``leo.embedding_dim``: ``D`` as a decimal string (must match the column type);
- ``leo.provenance``: a JSON object saying where the embeddings came from (dataset, split
  file, backbone checkpoint hash, source file hashes...; whatever the writer passed).

Files are written atomically with pyarrow: zstd compression with byte-stream-split encoding
for the embedding column, dictionary encoding for ``split`` and ``class``, row groups of about
16 MiB of embeddings.

Reading builds one contiguous ``(n, D)`` float32 tensor per split without per-row Python work:
the output array is allocated once and each row group's flat float buffer is copied into it,
so the peak memory is the array plus Arrow's temporaries for one row group (about three times
its size: compressed, decompressed and decoded buffers) plus the ids; measured at
tieredImageNet size (448,000 x 640), 1.18 x the array (``tests/test_store.py``). With
``normalize=True`` each row is divided in place by its L2 norm, ``x / ||x||``; a row of zeros
has no direction and is refused with an error naming its example id (no epsilon: a zero
embedding is a broken input).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from leo.utils.atomic import atomic_path
from leo.utils.errors import LeoInputError

SCHEMA_VERSION = "1"
KEY_VERSION = "leo.schema_version"
KEY_DIM = "leo.embedding_dim"
KEY_PROVENANCE = "leo.provenance"
ROW_GROUP_BYTES = 16 << 20  # embedding bytes per row group


def row_group_rows(dim: int) -> int:
    """Rows per row group for embeddings of width ``dim`` (about ``ROW_GROUP_BYTES``)."""
    return max(1, ROW_GROUP_BYTES // (4 * dim))


@dataclass
class EmbeddingSplit:
    """One split of embeddings, sorted by class.

    Attributes:
        embeddings: float32 ``(n, D)``, contiguous, rows sorted by label; L2-normalised rows
            when read with ``normalize=True``.
        labels: int64 ``(n,)`` in ``[0, num_classes)``, non-decreasing.
        class_names: ``num_classes`` names, ``class_names[label]``.
        example_ids: str ``(n,)``.
        provenance: the file's provenance object.
        split: the split name.
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    class_names: list[str]
    example_ids: np.ndarray
    provenance: dict
    split: str

    def __post_init__(self) -> None:
        n = self.embeddings.shape[0]
        if self.embeddings.ndim != 2 or self.labels.shape != (n,) or len(self.example_ids) != n:
            raise ValueError(
                f"EmbeddingSplit: embeddings {tuple(self.embeddings.shape)}, labels "
                f"{tuple(self.labels.shape)} and {len(self.example_ids)} example ids disagree"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes ``N_c``."""
        return len(self.class_names)

    @property
    def dim(self) -> int:
        """Embedding width ``D``."""
        return int(self.embeddings.shape[1])

    def class_counts(self) -> torch.Tensor:
        """int64 ``(num_classes,)``: examples per class."""
        return torch.bincount(self.labels, minlength=self.num_classes)

    def class_offsets(self) -> torch.Tensor:
        """int64 ``(num_classes + 1,)``: class ``c`` owns rows ``[off[c], off[c + 1])``."""
        counts = self.class_counts()
        offsets = torch.zeros(self.num_classes + 1, dtype=torch.int64, device=counts.device)
        offsets[1:] = torch.cumsum(counts, 0)
        return offsets

    def to(self, device: torch.device | str) -> EmbeddingSplit:
        """A copy with ``embeddings`` and ``labels`` on ``device``."""
        return dataclasses.replace(
            self, embeddings=self.embeddings.to(device), labels=self.labels.to(device)
        )


# -- writing ---------------------------------------------------------------------------------


def _str_column(path: Path, values: Sequence[str] | np.ndarray, what: str, n: int) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind == "O" and all(isinstance(v, str) for v in arr.ravel()):
        arr = arr.astype(np.str_)
    if arr.dtype.kind != "U" or arr.shape != (n,):
        raise LeoInputError(
            f"{path}: {what} must be {n} strings (one per embedding row), got {arr.dtype} "
            f"{arr.shape}"
        )
    empty = np.flatnonzero(arr == "")
    if empty.size:
        raise LeoInputError(f"{path}: {what}[{empty[0]}] is an empty string")
    return arr


def _first_duplicate(ids: np.ndarray) -> str | None:
    uniq, counts = np.unique(ids, return_counts=True)
    dup = uniq[counts > 1]
    return None if dup.size == 0 else str(dup[0])


def check_rows(where: str, emb: np.ndarray, ids: np.ndarray, start: int = 0) -> None:
    """Refuse non-finite or all-zero rows, a row group at a time (bounded temporaries).

    Args:
        where: message prefix naming the file and column, e.g. ``"x.parquet: column 'e'"``.
        emb: ``(m, D)`` rows ``start .. start + m`` of the array being checked.
        ids: ids indexed like ``emb`` (``ids[i]`` names row ``start + i``).
        start: row number of ``emb[0]`` in messages.

    Raises:
        LeoInputError: naming the first bad row and its id.
    """
    step = row_group_rows(emb.shape[1])
    for s in range(0, len(emb), step):
        block = emb[s : s + step]
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            i = s + int(np.argmin(finite))
            raise LeoInputError(
                f"{where} has a NaN or infinite value in row {start + i} (id {str(ids[i])!r})"
            )
        nonzero = block.any(axis=1)
        if not nonzero.all():
            i = s + int(np.argmin(nonzero))
            raise LeoInputError(
                f"{where} row {start + i} (id {str(ids[i])!r}) is all zeros and cannot be "
                "L2-normalised"
            )


def write_embeddings(
    path: str | os.PathLike,
    *,
    split: str,
    class_names: Sequence[str] | np.ndarray,
    example_ids: Sequence[str] | np.ndarray,
    embeddings: np.ndarray,
    provenance: dict,
) -> None:
    """Write one split atomically in the schema above, rows grouped by class.

    Args:
        path: the ``.parquet`` file to write (parents are created).
        split: the split name stored on every row.
        class_names: ``(n,)`` class name of each row.
        example_ids: ``(n,)`` unique ids.
        embeddings: ``(n, D)`` floating array (stored as float32), finite, no zero rows.
        provenance: JSON-serialisable dict stored as ``leo.provenance``.

    Raises:
        LeoInputError: inconsistent lengths, empty names, duplicate ids, non-finite or zero
            rows, or provenance that is not a JSON object; the message names ``path``.
    """
    path = Path(path)
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise LeoInputError(f"{path}: embeddings must be a non-empty (n, D) array, got {emb.shape}")
    if emb.dtype.kind != "f":
        raise LeoInputError(f"{path}: embeddings must be floating point, got {emb.dtype}")
    emb = np.ascontiguousarray(emb, dtype=np.float32)
    n, dim = emb.shape
    if not isinstance(split, str) or not split:
        raise LeoInputError(f"{path}: split must be a non-empty string, got {split!r}")
    names = _str_column(path, class_names, "class_names", n)
    ids = _str_column(path, example_ids, "example_ids", n)
    dup = _first_duplicate(ids)
    if dup is not None:
        raise LeoInputError(f"{path}: duplicate example_id {dup!r}")
    check_rows(f"{path}: embeddings", emb, ids)
    if not isinstance(provenance, dict):
        raise LeoInputError(f"{path}: provenance must be a dict, got {type(provenance).__name__}")
    try:
        prov_json = json.dumps(provenance, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LeoInputError(f"{path}: provenance is not JSON-serialisable ({exc})") from exc

    # Group rows by class, classes in order of first appearance, stable within a class.
    uniq, first, inverse = np.unique(names, return_index=True, return_inverse=True)
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(uniq))
    labels = rank[inverse.reshape(-1)]
    order = None if np.all(labels[1:] >= labels[:-1]) else np.argsort(labels, kind="stable")

    schema = pa.schema(
        [
            ("split", pa.string()),
            ("class", pa.string()),
            ("example_id", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ],
        metadata={KEY_VERSION: SCHEMA_VERSION, KEY_DIM: str(dim), KEY_PROVENANCE: prov_json},
    )
    step = row_group_rows(dim)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(
            tmp,
            schema,
            compression="zstd",
            use_dictionary=["split", "class"],
            column_encoding={"example_id": "PLAIN", "embedding": "BYTE_STREAM_SPLIT"},
            write_statistics=["split", "class", "example_id"],
        ) as writer:
            for s in range(0, n, step):
                rows = slice(s, s + step) if order is None else order[s : s + step]
                block = emb[rows]
                flat = pa.array(block.reshape(-1), type=pa.float32())
                batch = pa.record_batch(
                    [
                        pa.array([split] * len(block), type=pa.string()),
                        pa.array(names[rows], type=pa.string()),
                        pa.array(ids[rows], type=pa.string()),
                        pa.FixedSizeListArray.from_arrays(flat, dim),
                    ],
                    schema=schema,
                )
                writer.write_batch(batch)


# -- reading ---------------------------------------------------------------------------------


def _is_str(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _open(path: str | os.PathLike) -> tuple[Path, pq.ParquetFile, int, dict]:
    """Open ``path`` and check its schema and metadata; return (path, file, D, provenance)."""
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: no such file")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise LeoInputError(f"{path}: not a Parquet file ({exc})") from exc
    try:
        dim, provenance = _check_file(path, pf)
    except BaseException:
        pf.close()
        raise
    return path, pf, dim, provenance


def _check_file(path: Path, pf: pq.ParquetFile) -> tuple[int, dict]:
    """Check the columns and key-value metadata against the schema; return (D, provenance)."""
    schema = pf.schema_arrow
    for col in ("split", "class", "example_id"):
        if schema.get_field_index(col) < 0:
            raise LeoInputError(f"{path}: missing column '{col}'")
        if not _is_str(schema.field(col).type):
            raise LeoInputError(
                f"{path}: column '{col}' must be string, got {schema.field(col).type}"
            )
    if schema.get_field_index("embedding") < 0:
        raise LeoInputError(f"{path}: missing column 'embedding'")
    etype = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(etype) and etype.value_type == pa.float32()):
        raise LeoInputError(
            f"{path}: column 'embedding' must be fixed_size_list<float32>[D], got {etype}"
        )
    kv = {k.decode(): v.decode() for k, v in (pf.metadata.metadata or {}).items()}
    for key in (KEY_VERSION, KEY_DIM, KEY_PROVENANCE):
        if key not in kv:
            raise LeoInputError(f"{path}: missing metadata key '{key}'")
    if kv[KEY_VERSION] != SCHEMA_VERSION:
        raise LeoInputError(
            f"{path}: metadata '{KEY_VERSION}' is {kv[KEY_VERSION]!r}; this code reads "
            f"{SCHEMA_VERSION!r}"
        )
    if not kv[KEY_DIM].isdigit() or int(kv[KEY_DIM]) != etype.list_size:
        raise LeoInputError(
            f"{path}: metadata '{KEY_DIM}' is {kv[KEY_DIM]!r} but column 'embedding' has "
            f"{etype.list_size} values per row"
        )
    try:
        provenance = json.loads(kv[KEY_PROVENANCE])
    except json.JSONDecodeError as exc:
        raise LeoInputError(f"{path}: metadata '{KEY_PROVENANCE}' is not JSON ({exc})") from exc
    if not isinstance(provenance, dict):
        raise LeoInputError(f"{path}: metadata '{KEY_PROVENANCE}' must be a JSON object")
    return etype.list_size, provenance


def read_metadata(path: str | os.PathLike) -> dict:
    """Schema version, embedding dim, provenance and row count, from the footer only.

    Returns:
        ``{"schema_version": str, "embedding_dim": int, "provenance": dict, "num_rows": int}``.
    """
    _, pf, dim, provenance = _open(path)
    with pf:
        num_rows = pf.metadata.num_rows
    return {
        "schema_version": SCHEMA_VERSION,
        "embedding_dim": dim,
        "provenance": provenance,
        "num_rows": num_rows,
    }


def _dict_indices(path: Path, col: pa.ChunkedArray, name: str) -> tuple[np.ndarray, list[str]]:
    """Dictionary-encode a string column: (int64 indices (n,), dictionary values)."""
    if col.null_count:
        raise LeoInputError(f"{path}: column '{name}' has nulls")
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    col = col.unify_dictionaries()
    if col.num_chunks == 0:
        return np.zeros(0, np.int64), []
    values = col.chunk(0).dictionary.to_pylist()
    idx = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in col.chunks])
    return idx.astype(np.int64, copy=False), values


def read_embeddings(path: str | os.PathLike, *, normalize: bool = True) -> EmbeddingSplit:
    """Load one split into a contiguous float32 tensor, rows sorted by class.

    Args:
        path: a file written by ``write_embeddings`` (or any writer of the schema above).
        normalize: divide each row by its L2 norm, in place.

    Returns:
        The split; labels follow the class order of first appearance in the file.

    Raises:
        LeoInputError: missing or non-Parquet file, wrong columns or metadata, nulls, empty
            names, more than one split name, duplicate ids, non-finite or all-zero rows (refused
            even with ``normalize=False``: the schema forbids them); the message names the file
            and column or key.
    """
    path, pf, dim, provenance = _open(path)
    with pf:
        out, labels, class_names, example_ids, split = _read(path, pf, dim)
    emb = torch.from_numpy(out)
    if normalize:
        emb.div_(torch.linalg.vector_norm(emb, dim=1, keepdim=True))
    return EmbeddingSplit(
        embeddings=emb,
        labels=torch.from_numpy(labels),
        class_names=class_names,
        example_ids=example_ids,
        provenance=provenance,
        split=split,
    )


def _read(
    path: Path, pf: pq.ParquetFile, dim: int
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, str]:
    """Read and check the rows: (embeddings (n, D), labels (n,), class names, ids (n,), split)."""
    n = pf.metadata.num_rows
    if n == 0:
        raise LeoInputError(f"{path}: has no rows")
    meta = pf.read(columns=["split", "class", "example_id"])

    split_idx, split_values = _dict_indices(path, meta.column("split"), "split")
    used_splits = sorted({split_values[i] for i in np.unique(split_idx)})
    if len(used_splits) != 1 or not used_splits[0]:
        raise LeoInputError(
            f"{path}: column 'split' must hold one non-empty name, got {used_splits}"
        )

    class_idx, class_values = _dict_indices(path, meta.column("class"), "class")
    present, first = np.unique(class_idx, return_index=True)
    order = present[np.argsort(first)]  # dictionary indices in order of first appearance
    class_names = [class_values[i] for i in order]
    if "" in class_names:
        raise LeoInputError(f"{path}: column 'class' has an empty class name")
    remap = np.zeros(len(class_values), dtype=np.int64)
    remap[order] = np.arange(len(order))
    labels = remap[class_idx]

    id_col = meta.column("example_id")
    if id_col.null_count:
        raise LeoInputError(f"{path}: column 'example_id' has nulls")
    if pc.count_distinct(id_col).as_py() != n:
        counts = pc.value_counts(id_col)
        dup = counts.filter(pc.greater(counts.field("counts"), 1))[0]["values"]
        raise LeoInputError(f"{path}: column 'example_id' has duplicate {dup.as_py()!r}")
    example_ids = id_col.to_numpy().astype(np.str_)
    del meta, id_col

    out = np.empty((n, dim), dtype=np.float32)
    start = 0
    for g in range(pf.num_row_groups):
        col = pf.read_row_group(g, columns=["embedding"]).column(0)
        for chunk in col.chunks:
            if chunk.null_count or chunk.values.null_count:
                raise LeoInputError(f"{path}: column 'embedding' has nulls (row group {g})")
            rows = out[start : start + len(chunk)]  # a view: fill it from the flat buffer
            rows.reshape(-1)[:] = chunk.flatten().to_numpy(zero_copy_only=True)
            check_rows(f"{path}: column 'embedding'", rows, example_ids[start:], start)
            start += len(chunk)
        del col
    if start != n:  # pragma: no cover - pyarrow guarantees row counts
        raise LeoInputError(f"{path}: read {start} embeddings, footer says {n}")

    if np.any(labels[1:] < labels[:-1]):  # not grouped by class: reorder (one extra copy)
        perm = np.argsort(labels, kind="stable")
        out, labels, example_ids = out[perm], labels[perm], example_ids[perm]

    return out, labels, class_names, example_ids, used_splits[0]


def read_class_names(path: str | os.PathLike) -> list[str]:
    """The distinct class names of a split file, in order of first appearance (one column
    read; the file is checked as :func:`read_metadata` checks it)."""
    path, pf, _, _ = _open(path)
    with pf:
        col = pf.read(columns=["class"]).column("class")
    idx, values = _dict_indices(path, col, "class")
    _, first = np.unique(idx, return_index=True)
    return [values[i] for i in idx[np.sort(first)]]


def check_disjoint_classes(paths: Sequence[str | os.PathLike]) -> None:
    """Refuse split files that share a class (meta-train, -validation and -test classes are
    disjoint by definition). Files that do not exist are skipped; a ``train`` file written
    with ``train_on_val`` (its provenance says so) may hold the val classes.

    Raises:
        LeoInputError: naming the class and both files.
    """
    files = [Path(p) for p in paths if Path(p).is_file()]
    merged = {p: bool(read_metadata(p)["provenance"].get("train_on_val")) for p in files}
    seen: dict[str, Path] = {}
    for p in files:
        for name in read_class_names(p):
            other = seen.setdefault(name, p)
            if (
                other == p
                or (merged[other] and p.stem == "val")
                or (merged[p] and other.stem == "val")
            ):
                continue
            raise LeoInputError(
                f"{p}: class {name!r} is also in {other}; the splits must not share classes"
            )
