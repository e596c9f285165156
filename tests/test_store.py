"""Tests for leo.data.store: the documented Parquet schema, loading, validation and peak memory."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from leo.data import store
from leo.data.store import EmbeddingSplit, read_embeddings, read_metadata, write_embeddings
from leo.utils.errors import LeoInputError

REPO = Path(__file__).resolve().parents[1]
PROV = {"dataset": "toy", "split_file": "splits.json", "sources": {"a.pkl": "ab" * 32}}


def _toy(n_per_class=(3, 5, 2), dim=6, seed=0):
    """Rows with interleaved classes: class names (n,), ids (n,), embeddings (n, dim)."""
    rng = np.random.default_rng(seed)
    names = np.concatenate([[f"cls{c}"] * k for c, k in enumerate(n_per_class)])
    names = names[rng.permutation(len(names))]  # interleave the classes
    ids = np.array([f"img{i:03d}" for i in range(len(names))])
    emb = rng.standard_normal((len(names), dim)).astype(np.float32)
    return names, ids, emb


def _write(path, names, ids, emb, split="train", provenance=PROV):
    write_embeddings(
        path, split=split, class_names=names, example_ids=ids, embeddings=emb, provenance=provenance
    )


def _raw_table(n=4, dim=3, **columns):
    """A table in the documented schema, built by hand; ``columns`` override arrays."""
    rng = np.random.default_rng(1)
    cols = {
        "split": pa.array(["val"] * n),
        "class": pa.array(["a", "a", "b", "b"][:n]),
        "example_id": pa.array([f"e{i}" for i in range(n)]),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(rng.random(n * dim, dtype=np.float32) + 0.1), dim
        ),
    }
    cols.update(columns)
    return pa.table(cols)


def _meta(dim=3, **overrides):
    meta = {
        "leo.schema_version": "1",
        "leo.embedding_dim": str(dim),
        "leo.provenance": json.dumps({"x": 1}),
    }
    meta.update(overrides)
    return {k: v for k, v in meta.items() if v is not None}


def _write_raw(path, table, meta):
    pq.write_table(table.replace_schema_metadata(meta), path)


# -- round trip ------------------------------------------------------------------------------


def test_round_trip_groups_rows_by_class_in_first_appearance_order(tmp_path):
    names, ids, emb = _toy()
    _write(tmp_path / "s.parquet", names, ids, emb)
    got = read_embeddings(tmp_path / "s.parquet", normalize=False)

    # Independent expectation: classes by first appearance, rows of a class in input order.
    classes = list(dict.fromkeys(names.tolist()))
    order = [i for c in classes for i in range(len(names)) if names[i] == c]
    assert got.class_names == classes
    assert got.example_ids.tolist() == ids[order].tolist()
    assert torch.equal(got.embeddings, torch.from_numpy(emb[order]))
    assert got.labels.tolist() == [classes.index(names[i]) for i in order]
    assert got.split == "train" and got.provenance == PROV
    assert got.embeddings.dtype == torch.float32 and got.embeddings.is_contiguous()
    assert got.labels.dtype == torch.int64
    assert got.example_ids.dtype.kind == "U"


def test_normalize_divides_each_row_by_its_l2_norm(tmp_path):
    names, ids, emb = _toy(dim=640)
    _write(tmp_path / "s.parquet", names, ids, emb)
    raw = read_embeddings(tmp_path / "s.parquet", normalize=False).embeddings.numpy()
    got = read_embeddings(tmp_path / "s.parquet").embeddings.numpy()
    x = raw.astype(np.float64)
    expected = x / np.sqrt((x * x).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_class_counts_offsets_and_properties(tmp_path):
    names, ids, emb = _toy(n_per_class=(4, 1, 7, 2), dim=5)
    _write(tmp_path / "s.parquet", names, ids, emb)
    got = read_embeddings(tmp_path / "s.parquet")
    expected_counts = [int((names == c).sum()) for c in got.class_names]
    assert got.num_classes == 4 and got.dim == 5
    assert got.class_counts().tolist() == expected_counts
    offsets = got.class_offsets().tolist()
    assert offsets == [0, *np.cumsum(expected_counts).tolist()]
    for c in range(got.num_classes):
        assert (got.labels[offsets[c] : offsets[c + 1]] == c).all()
    moved = got.to("meta")
    assert moved.embeddings.device.type == "meta" and moved.labels.device.type == "meta"
    assert got.embeddings.device.type == "cpu" and moved.class_names == got.class_names


def test_embedding_split_checks_shapes():
    with pytest.raises(ValueError, match="disagree"):
        EmbeddingSplit(
            torch.zeros(3, 2),
            torch.zeros(2, dtype=torch.int64),
            ["a"],
            np.array(["x"] * 3),
            {},
            "s",
        )


def test_file_follows_the_documented_schema(tmp_path):
    names, ids, emb = _toy(dim=4)
    _write(tmp_path / "s.parquet", names, ids, emb, split="val")
    pf = pq.ParquetFile(tmp_path / "s.parquet")
    schema = pf.schema_arrow
    assert schema.names == ["split", "class", "example_id", "embedding"]
    assert schema.field("split").type == pa.string() and schema.field("class").type == pa.string()
    assert schema.field("example_id").type == pa.string()
    assert schema.field("embedding").type == pa.list_(pa.float32(), 4)
    kv = {k.decode(): v.decode() for k, v in pf.metadata.metadata.items()}
    assert kv["leo.schema_version"] == "1" and kv["leo.embedding_dim"] == "4"
    assert json.loads(kv["leo.provenance"]) == PROV
    table = pf.read()
    assert set(table.column("split").to_pylist()) == {"val"}
    # Rows grouped by class: each class is one contiguous run.
    runs = [
        c for i, c in enumerate(table.column("class").to_pylist()) if i == 0 or c != _prev(table, i)
    ]
    assert len(runs) == len(set(runs)) == 3
    assert read_metadata(tmp_path / "s.parquet") == {
        "schema_version": "1",
        "embedding_dim": 4,
        "provenance": PROV,
        "num_rows": len(ids),
    }


def _prev(table, i):
    return table.column("class")[i - 1].as_py()


def test_many_row_groups_and_deterministic_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "ROW_GROUP_BYTES", 4 * 8 * 3)  # 3 rows of width 8 per group
    names, ids, emb = _toy(n_per_class=(5, 6, 4), dim=8)
    _write(tmp_path / "a.parquet", names, ids, emb)
    _write(tmp_path / "b.parquet", names, ids, emb)
    assert pq.ParquetFile(tmp_path / "a.parquet").num_row_groups == 5
    digest = [
        hashlib.sha256((tmp_path / f).read_bytes()).hexdigest() for f in ("a.parquet", "b.parquet")
    ]
    assert digest[0] == digest[1]
    got = read_embeddings(tmp_path / "a.parquet", normalize=False)
    for i, row in zip(got.example_ids, got.embeddings, strict=True):
        assert torch.equal(row, torch.from_numpy(emb[ids.tolist().index(i)]))


def test_reads_an_ungrouped_file_from_another_writer(tmp_path):
    table = _raw_table(
        n=4,
        **{
            "class": pa.array(["b", "a", "b", "a"]),
            "split": pa.array(["test"] * 4, type=pa.large_string()),
        },
    )
    _write_raw(tmp_path / "x.parquet", table, _meta())
    got = read_embeddings(tmp_path / "x.parquet", normalize=False)
    assert got.class_names == ["b", "a"] and got.labels.tolist() == [0, 0, 1, 1]
    assert got.example_ids.tolist() == ["e0", "e2", "e1", "e3"]
    flat = table.column("embedding").combine_chunks().flatten().to_numpy().reshape(4, 3)
    assert torch.equal(got.embeddings, torch.from_numpy(flat[[0, 2, 1, 3]]))
    assert got.split == "test"


# -- bad files -------------------------------------------------------------------------------


def test_missing_and_non_parquet_files(tmp_path):
    with pytest.raises(LeoInputError, match=r"nope\.parquet: no such file"):
        read_embeddings(tmp_path / "nope.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(LeoInputError, match=r"text\.parquet: not a Parquet file"):
        read_embeddings(tmp_path / "text.parquet")
    with pytest.raises(LeoInputError, match=r"text\.parquet: not a Parquet file"):
        read_metadata(tmp_path / "text.parquet")
    with pytest.raises(LeoInputError, match="no such file"):
        read_embeddings(tmp_path)


_FLOATS = pa.array(np.ones(12, dtype=np.float64))
_BAD_FILES = {
    "missing column": (dict(), "column 'class'", "drop_class"),
    "float64 embedding": (
        {"embedding": pa.FixedSizeListArray.from_arrays(_FLOATS, 3)},
        "column 'embedding' must be fixed_size_list<float32>",
        None,
    ),
    "variable-length embedding": (
        {"embedding": pa.array([[1.0, 2.0, 3.0]] * 4, type=pa.list_(pa.float32()))},
        "column 'embedding' must be fixed_size_list<float32>",
        None,
    ),
    "int class": ({"class": pa.array([1, 1, 2, 2])}, "column 'class' must be string", None),
    "null class": ({"class": pa.array(["a", None, "b", "b"])}, "column 'class' has nulls", None),
    "empty class": ({"class": pa.array(["a", "", "b", "b"])}, "empty class name", None),
    "two splits": ({"split": pa.array(["a", "a", "b", "b"])}, "column 'split' must hold one", None),
    "duplicate id": (
        {"example_id": pa.array(["e0", "e1", "e1", "e3"])},
        "column 'example_id' has duplicate 'e1'",
        None,
    ),
    "nan": (
        {
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array([1.0] * 7 + [np.nan] + [1.0] * 4, pa.float32()), 3
            )
        },
        r"NaN or infinite value in row 2 \(id 'e2'\)",
        None,
    ),
    "inf": (
        {
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array([np.inf] + [1.0] * 11, pa.float32()), 3
            )
        },
        r"NaN or infinite value in row 0 \(id 'e0'\)",
        None,
    ),
    "zero row": (
        {
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array([1.0] * 9 + [0.0] * 3, pa.float32()), 3
            )
        },
        r"row 3 \(id 'e3'\) is all zeros",
        None,
    ),
    "no version": ({}, "missing metadata key 'leo.schema_version'", {"leo.schema_version": None}),
    "version 2": ({}, "'leo.schema_version' is '2'", {"leo.schema_version": "2"}),
    "dim mismatch": (
        {},
        "'leo.embedding_dim' is '4' but column 'embedding' has 3",
        {"leo.embedding_dim": "4"},
    ),
    "bad provenance": ({}, "'leo.provenance' is not JSON", {"leo.provenance": "{oops"}),
    "list provenance": ({}, "'leo.provenance' must be a JSON object", {"leo.provenance": "[1]"}),
}


@pytest.mark.parametrize("case", sorted(_BAD_FILES))
def test_bad_files_raise_one_line_errors_naming_file_and_column(tmp_path, case):
    columns, message, extra = _BAD_FILES[case]
    table = _raw_table(**columns)
    if extra == "drop_class":
        table = table.drop_columns(["class"])
    meta = _meta(**extra) if isinstance(extra, dict) else _meta()
    path = tmp_path / f"{case.replace(' ', '_')}.parquet"
    _write_raw(path, table, meta)
    with pytest.raises(LeoInputError, match=message) as info:
        read_embeddings(path, normalize=False)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_empty_file_is_refused(tmp_path):
    table = _raw_table().slice(0, 0)
    _write_raw(tmp_path / "e.parquet", table, _meta())
    with pytest.raises(LeoInputError, match="has no rows"):
        read_embeddings(tmp_path / "e.parquet")


# -- bad writer input ------------------------------------------------------------------------


def _bad_input(case):
    names, ids, emb = _toy(dim=3)
    kwargs = dict(
        split="train", class_names=names, example_ids=ids, embeddings=emb, provenance=PROV
    )
    if case == "nan":
        emb = emb.copy()
        emb[4, 1] = np.nan
        kwargs["embeddings"] = emb
        return kwargs, rf"NaN or infinite value in row 4 \(id '{ids[4]}'\)"
    if case == "zero row":
        emb = emb.copy()
        emb[2] = 0
        kwargs["embeddings"] = emb
        return kwargs, "row 2 .* is all zeros"
    if case == "duplicate id":
        kwargs["example_ids"] = np.array([*ids[:-1], ids[0]])
        return kwargs, f"duplicate example_id '{ids[0]}'"
    if case == "short names":
        kwargs["class_names"] = names[:-1]
        return kwargs, "class_names must be 10 strings"
    if case == "empty name":
        kwargs["class_names"] = np.array(["", *names[1:]])
        return kwargs, r"class_names\[0\] is an empty string"
    if case == "1-D":
        kwargs["embeddings"] = emb[:, 0]
        return kwargs, r"non-empty \(n, D\) array"
    if case == "int":
        kwargs["embeddings"] = emb.astype(np.int32)
        return kwargs, "floating point"
    if case == "provenance":
        kwargs["provenance"] = {"x": object()}
        return kwargs, "provenance is not JSON-serialisable"
    if case == "split":
        kwargs["split"] = ""
        return kwargs, "split must be a non-empty string"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "zero row",
        "duplicate id",
        "short names",
        "empty name",
        "1-D",
        "int",
        "provenance",
        "split",
    ],
)
def test_writer_refuses_bad_input_and_leaves_the_old_file(tmp_path, case):
    path = tmp_path / "out" / "s.parquet"
    names, ids, emb = _toy(dim=3, seed=5)
    _write(path, names, ids, emb, split="old")
    before = path.read_bytes()
    kwargs, message = _bad_input(case)
    with pytest.raises(LeoInputError, match=message):
        write_embeddings(path, **kwargs)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["s.parquet"]


def test_float64_input_is_stored_as_float32(tmp_path):
    names, ids, emb = _toy(dim=3)
    _write(tmp_path / "s.parquet", names, ids, emb.astype(np.float64) / 3)
    got = read_embeddings(tmp_path / "s.parquet", normalize=False)
    assert got.embeddings.dtype == torch.float32
    row = ids.tolist().index(got.example_ids[0])
    assert torch.equal(
        got.embeddings[0], torch.from_numpy((emb.astype(np.float64) / 3)[row].astype(np.float32))
    )


# -- peak memory at tieredImageNet size -------------------------------------------------------

_MEASURE = textwrap.dedent(
    """
    import resource, sys, threading, time
    import numpy, pyarrow, pyarrow.parquet, torch
    from leo.data.store import read_embeddings

    def anon_kib():
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])

    peak = base = anon_kib()
    done = threading.Event()

    def sample():  # Arrow and torch release the GIL while they copy, so this keeps sampling
        global peak
        while not done.is_set():
            peak = max(peak, anon_kib())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    t0 = time.perf_counter()
    s = read_embeddings(sys.argv[1])
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak = max(peak, anon_kib())
    held = anon_kib() - base
    norms = torch.linalg.vector_norm(s.embeddings[::997], dim=1)
    print(peak - base, held, s.embeddings.shape[0], s.embeddings.shape[1], s.num_classes,
          float(norms.min()), float(norms.max()), seconds)
    """
)


@pytest.mark.slow  # ~15-20 s on 2 idle cores (generation ~half); kept in the default run
def test_tiered_sized_split_loads_within_1_5x_of_the_array(tmp_path):
    """448,000 x 640 float32 (1.15 GB): peak RSS growth while loading <= 1.5 x the array.

    The file is generated in chunks (documented schema, the writer's encodings) so this
    process never holds the array. A fresh interpreter samples its anonymous resident memory
    (``RssAnon``, every 0.5 ms on a thread) through ``read_embeddings``: unlike ``ru_maxrss``
    this leaves out file-backed pages (torch's shared libraries), which the kernel may drop or
    bring back during the load under page-cache pressure.
    """
    n, dim, n_classes = 448_000, 640, 351
    path = tmp_path / "tiered_train.parquet"
    schema = pa.schema(
        [
            ("split", pa.string()),
            ("class", pa.string()),
            ("example_id", pa.string()),
            ("embedding", pa.list_(pa.float32(), dim)),
        ],
        metadata=_meta(dim=dim),
    )
    labels = np.arange(n) * n_classes // n  # grouped, 1276-1277 rows per class
    rng = np.random.default_rng(0)
    step = store.row_group_rows(dim)
    with pq.ParquetWriter(
        path,
        schema,
        compression="zstd",
        use_dictionary=["split", "class"],
        column_encoding={"example_id": "PLAIN", "embedding": "BYTE_STREAM_SPLIT"},
        write_statistics=False,
    ) as writer:
        for s in range(0, n, step):
            rows = range(s, min(n, s + step))
            flat = rng.random(len(rows) * dim, dtype=np.float32) + 0.1
            batch = [
                pa.array(["train"] * len(rows)),
                pa.array([f"n{labels[i]:08d}" for i in rows]),
                pa.array([f"n{labels[i]:08d}_{i}.JPEG" for i in rows]),
                pa.FixedSizeListArray.from_arrays(pa.array(flat), dim),
            ]
            writer.write_batch(pa.record_batch(batch, schema=schema))

    try:
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            check=True,
        ).stdout.split()
    finally:
        path.unlink()  # pytest keeps recent tmp dirs; do not leave 1 GB behind
    peak_kib, held_kib, rows, width, classes = map(int, out[:5])
    norm_min, norm_max, seconds = map(float, out[5:])
    array_bytes = n * dim * 4
    ratio, held = peak_kib * 1024 / array_bytes, held_kib * 1024 / array_bytes
    print(
        f"peak anonymous memory growth {ratio:.3f} x array ({array_bytes / 1e9:.2f} GB), "
        f"{held:.3f} x held after the load, load {seconds:.1f} s"
    )
    assert (rows, width, classes) == (n, dim, n_classes)
    assert abs(norm_min - 1) < 1e-5 and abs(norm_max - 1) < 1e-5
    assert held >= 0.99  # the measurement sees the array itself
    assert ratio <= 1.5
