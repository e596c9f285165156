"""Tests for leo.data.published on small files in exactly the published format.

Python 2 fixtures come from ``_py2_pickle``, which writes the protocol-2 opcodes that
CPython 2.7's ``cPickle.dumps(d, protocol=2)`` writes with numpy 1.16 (``numpy.core``
globals, Python 2 ``str`` opcodes, memo entries numbered from 1 for the objects cPickle
memoizes). ``test_py2_writer_matches_real_python2_bytes`` checks it byte for byte against
``PY2_BYTES_KEYS``, written by CPython 2.7.18 + numpy 1.16.6 for::

    cPickle.dumps({'embeddings': np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5,
                   'keys': np.array(['p-n01-n01_1.JPEG', 'p-n02-n02_7.JPEG']),  # S16
                   'labels': np.array([0, 1])}, protocol=2)
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct

import numpy as np
import pytest

from leo.data.published import import_published, read_published_split
from leo.data.store import read_embeddings, read_metadata
from leo.utils.errors import LeoInputError

PY2_BYTES_KEYS = bytes.fromhex(
    "80027d71012855046b6579737102636e756d70792e636f72652e6d756c746961727261790a5f7265636f6e73"
    "74727563740a7103636e756d70790a6e6461727261790a71044b008555016287527105284b014b0285636e75"
    "6d70790a64747970650a710655035331364b004b0187527107284b0355017c4e4e4e4b104b014b0074628955"
    "20702d6e30312d6e30315f312e4a504547702d6e30322d6e30325f372e4a504547746255066c6162656c7371"
    "08680368044b008555016287527109284b014b02856806550269384b004b018752710a284b0355013c4e4e4e"
    "4affffffff4affffffff4b007462895510000000000000000001000000000000007462550a656d6265646469"
    "6e6773710b680368044b00855501628752710c284b014b024b03866806550266344b004b018752710d284b03"
    "55013c4e4e4e4affffffff4affffffff4b0074628955180000003f0000c03f00002040000060400000904000"
    "00b0407462752e"
)
CLASSES = {"train": ["n011", "n012", "n013"], "val": ["n021", "n022"], "test": ["n031", "n032"]}
PER_CLASS, DIM = 4, 640


# -- a Python 2 (cPickle, protocol 2) writer for fixtures ------------------------------------


def _py2_pickle(d: dict) -> bytes:
    """Protocol-2 bytes of ``{str: ndarray}`` as CPython 2.7 cPickle + numpy 1.16 write them."""
    out = bytearray(b"\x80\x02")
    memo: dict[str, int] = {}

    def put(key: str | None = None) -> None:
        index = len(memo) + 1
        memo[key or f"#{index}"] = index
        out.extend(b"q" + bytes([index]) if index < 256 else b"r" + struct.pack("<I", index))

    def text(s: str | bytes) -> None:  # a Python 2 str
        raw = s.encode("latin1") if isinstance(s, str) else s
        out.extend(
            b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))
        )
        out.extend(raw)

    def integer(v: int) -> None:
        if 0 <= v < 256:
            out.extend(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            out.extend(b"M" + struct.pack("<H", v))
        else:
            out.extend(b"J" + struct.pack("<i", v))

    def tup(items: list) -> None:
        if len(items) > 3:
            out.extend(b"(")
        for item in items:
            atom(item)
        out.extend({0: b")", 1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t"))

    def atom(v) -> None:
        if v is None:
            out.extend(b"N")
        elif isinstance(v, bool):
            out.extend(b"\x88" if v else b"\x89")
        elif isinstance(v, int):
            integer(v)
        elif isinstance(v, str | bytes):
            text(v)
        else:
            raise TypeError(v)

    def glob(module: str, name: str) -> None:
        key = f"{module}.{name}"
        if key in memo:
            out.extend(b"h" + bytes([memo[key]]))
        else:
            out.extend(f"c{module}\n{name}\n".encode())
            put(key)

    def array(a: np.ndarray) -> None:
        glob("numpy.core.multiarray", "_reconstruct")
        glob("numpy", "ndarray")
        out.extend(b"K\x00\x85U\x01b\x87R")
        put()
        out.extend(b"(K\x01")
        tup(list(a.shape))
        glob("numpy", "dtype")
        _, (descr, _, _), state = a.dtype.__reduce__()
        tup([descr, 0, 1])  # numpy 1.16 passes align/copy as ints
        out.extend(b"R")
        put()
        tup(list(state))
        out.extend(b"b\x89")  # BUILD the dtype; is_fortran = False
        if a.dtype == object:  # a list of Python 2 str, each memoized
            out.extend(b"]")
            put()
            out.extend(b"(")
            for item in a:
                text(item)
                put()
            out.extend(b"e")
        else:
            text(a.tobytes())
        out.extend(b"tb")

    out.extend(b"}")
    put()
    out.extend(b"(")
    for key, value in d.items():
        text(key)
        put()
        array(value)
    out.extend(b"u.")
    return bytes(out)


def test_py2_writer_matches_real_python2_bytes():
    d = {
        "keys": np.array([b"p-n01-n01_1.JPEG", b"p-n02-n02_7.JPEG"]),
        "labels": np.array([0, 1]),
        "embeddings": np.arange(6, dtype=np.float32).reshape(2, 3) + 0.5,
    }
    assert _py2_pickle(d) == PY2_BYTES_KEYS


# -- fixtures --------------------------------------------------------------------------------


def _split_data(split: str, seed: int) -> dict:
    """3 or 2 classes x 4 images x 640-d, rows grouped by class as in the published files."""
    rng = np.random.default_rng(seed)
    classes = CLASSES[split]
    keys = [f"{split}-{c}-{c}_{i:04d}.JPEG" for c in classes for i in range(PER_CLASS)]
    labels = np.repeat(np.arange(len(classes)) + 10 * seed, PER_CLASS)
    emb = rng.random((len(keys), DIM), dtype=np.float32) + 0.01
    return {"embeddings": emb, "keys": keys, "labels": labels}


def _encode(d: dict, fmt: str) -> bytes:
    """The published dict as a pickle: Python 2 (bytes or object keys) or Python 3."""
    if fmt == "py2-bytes-keys":
        keys = np.array([k.encode() for k in d["keys"]])
        return _py2_pickle({"embeddings": d["embeddings"], "keys": keys, "labels": d["labels"]})
    if fmt == "py2-object-keys":
        keys = np.array(d["keys"], dtype=object)
        return _py2_pickle({"embeddings": d["embeddings"], "keys": keys, "labels": d["labels"]})
    if fmt == "py3-str-keys":
        return pickle.dumps(dict(d, keys=list(d["keys"])), protocol=4)
    if fmt == "py3-bytes-dict-keys":
        data = {k.encode(): v for k, v in d.items()}
        data[b"keys"] = np.array(d["keys"])
        return pickle.dumps(data, protocol=5)
    raise AssertionError(fmt)


def _tree(root, fmt="py2-bytes-keys", dataset="miniImageNet", view="center", **override):
    """Write all three split files under ``root``; ``override[split]`` replaces a file's bytes."""
    data = {}
    for seed, split in enumerate(("train", "val", "test")):
        data[split] = _split_data(split, seed)
        path = root / dataset / view / f"{split}_embeddings.pkl"
        path.parent.mkdir(parents=True, exist_ok=True)
        raw = override.get(split)
        path.write_bytes(raw if raw is not None else _encode(data[split], fmt))
    return data


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.sqrt((x * x).sum(axis=1, keepdims=True))


# -- reading ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt", ["py2-bytes-keys", "py2-object-keys", "py3-str-keys", "py3-bytes-dict-keys"]
)
def test_read_published_split_in_every_format(tmp_path, fmt):
    data = _tree(tmp_path, fmt)
    emb, classes, ids = read_published_split(tmp_path, "miniImageNet", "center", "train")
    assert emb.dtype == np.float32 and np.array_equal(emb, data["train"]["embeddings"])
    assert ids.tolist() == data["train"]["keys"] and all(type(i) is str for i in ids.tolist())
    assert classes.tolist() == [k.split("-")[1] for k in data["train"]["keys"]]


def test_float64_embeddings_are_converted(tmp_path):
    d = _split_data("train", 0)
    d64 = dict(d, embeddings=d["embeddings"].astype(np.float64) / 7)
    _tree(tmp_path, train=pickle.dumps(d64, protocol=2))
    emb, _, _ = read_published_split(tmp_path, "miniImageNet", "center", "train")
    assert emb.dtype == np.float32 and np.array_equal(emb, (d64["embeddings"]).astype(np.float32))


def test_whole_number_float_labels_are_accepted(tmp_path):
    d = _split_data("train", 0)
    _tree(tmp_path, train=pickle.dumps(dict(d, labels=d["labels"].astype(np.float64)), protocol=2))
    _, classes, _ = read_published_split(tmp_path, "miniImageNet", "center", "train")
    assert classes.tolist() == [k.split("-")[1] for k in d["keys"]]
    bad = dict(d, labels=d["labels"] + 0.5)
    _tree(tmp_path, train=pickle.dumps(bad, protocol=2))
    with pytest.raises(LeoInputError, match="'labels' must be 12 integers"):
        read_published_split(tmp_path, "miniImageNet", "center", "train")


# -- import ----------------------------------------------------------------------------------


def test_import_round_trip(tmp_path):
    data = _tree(tmp_path / "emb")
    out = import_published(tmp_path / "emb", "miniImageNet", "center", tmp_path / "out")
    assert out == {s: tmp_path / "out" / f"{s}.parquet" for s in ("train", "val", "test")}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        ["train.parquet", "val.parquet", "test.parquet"]
    )
    for split, path in out.items():
        got = read_embeddings(path)
        src = data[split]
        assert got.split == split and got.class_names == CLASSES[split]
        assert got.example_ids.tolist() == src["keys"]  # already grouped: file order kept
        np.testing.assert_allclose(
            got.embeddings.numpy(), _normalised(src["embeddings"]), rtol=1e-6, atol=1e-7
        )
        assert got.class_counts().tolist() == [PER_CLASS] * len(CLASSES[split])
        pkl = tmp_path / "emb" / "miniImageNet" / "center" / f"{split}_embeddings.pkl"
        assert got.provenance == {
            "source": "published LEO embeddings (Rusu et al., ICLR 2019)",
            "dataset": "miniImageNet",
            "view": "center",
            "split": split,
            "train_on_val": False,
            "files": [
                {
                    "path": f"miniImageNet/center/{split}_embeddings.pkl",
                    "sha256": hashlib.sha256(pkl.read_bytes()).hexdigest(),
                }
            ],
        }


def test_train_on_val_meta_trains_on_train_and_val_classes(tmp_path):
    data = _tree(tmp_path / "emb", "py3-str-keys", dataset="tieredImageNet")
    out = import_published(
        tmp_path / "emb", "tieredImageNet", "center", tmp_path / "out", train_on_val=True
    )
    train = read_embeddings(out["train"], normalize=False)
    assert train.class_names == CLASSES["train"] + CLASSES["val"]
    assert train.example_ids.tolist() == data["train"]["keys"] + data["val"]["keys"]
    expected = np.concatenate([data["train"]["embeddings"], data["val"]["embeddings"]])
    assert np.array_equal(train.embeddings.numpy(), expected)
    assert [f["path"] for f in train.provenance["files"]] == [
        "tieredImageNet/center/train_embeddings.pkl",
        "tieredImageNet/center/val_embeddings.pkl",
    ]
    assert train.provenance["train_on_val"] is True
    val = read_embeddings(out["val"])
    assert val.class_names == CLASSES["val"] and len(val.example_ids) == 2 * PER_CLASS
    assert read_metadata(out["test"])["provenance"]["train_on_val"] is True


def test_sha256_checks(tmp_path):
    _tree(tmp_path / "emb")
    root = tmp_path / "emb"
    files = {
        s: root / "miniImageNet/center" / f"{s}_embeddings.pkl" for s in ("train", "val", "test")
    }
    good = {s: hashlib.sha256(p.read_bytes()).hexdigest() for s, p in files.items()}
    by_path = {f"miniImageNet/center/{s}_embeddings.pkl": h for s, h in good.items()}
    import_published(root, "miniImageNet", "center", tmp_path / "a", expected_sha256=good)
    import_published(root, "miniImageNet", "center", tmp_path / "b", expected_sha256=by_path)

    bad = dict(good, val="0" * 64)
    with pytest.raises(LeoInputError, match=r"val_embeddings\.pkl: sha256 .* does not match"):
        import_published(root, "miniImageNet", "center", tmp_path / "c", expected_sha256=bad)
    assert not (tmp_path / "c").exists()
    partial = {"train": good["train"]}
    with pytest.raises(LeoInputError, match=r"val_embeddings\.pkl: expected_sha256 has no entry"):
        import_published(root, "miniImageNet", "center", tmp_path / "d", expected_sha256=partial)
    assert not (tmp_path / "d").exists()


# -- refusals --------------------------------------------------------------------------------


def _malformed(case: str) -> tuple[bytes, str]:
    """The train file's bytes for a malformed ``case`` and the expected message."""
    d = _split_data("train", 0)
    keys = list(d["keys"])
    if case == "key without dashes":
        keys[5] = "n012_0001.JPEG"
        return _encode(
            dict(d, keys=keys), "py2-bytes-keys"
        ), r"keys\[5\] = b'n012_0001.JPEG' is not"
    if case == "image of another class":
        keys[2] = "train-n011-n999_0002.JPEG"
        return _encode(dict(d, keys=keys), "py3-str-keys"), r"keys\[2\] .* does not start with"
    if case == "duplicate key":
        keys[7] = keys[6]
        return _encode(
            dict(d, keys=keys), "py2-object-keys"
        ), r"keys\[7\] .* repeats the key of keys\[6\]"
    if case == "duplicate image":
        keys[3] = "other-" + keys[0].split("-", 1)[1]
        return _encode(
            dict(d, keys=keys), "py3-str-keys"
        ), r"keys\[3\] .* repeats the image of keys\[0\]"
    if case == "short keys":
        return _encode(dict(d, keys=keys[:-1]), "py3-str-keys"), "'keys' must hold 12 strings"
    if case == "short labels":
        return _encode(
            dict(d, labels=d["labels"][:-1]), "py2-bytes-keys"
        ), "'labels' must be 12 integers"
    if case == "1-D embeddings":
        return _encode(
            dict(d, embeddings=d["embeddings"][:, 0].copy()), "py2-bytes-keys"
        ), "'embeddings' must be a 2-D float array"
    if case == "int embeddings":
        return pickle.dumps(
            dict(d, embeddings=np.ones((12, DIM), np.int32))
        ), "2-D float array, got int32"
    if case == "missing dict key":
        return pickle.dumps(
            {"embeddings": d["embeddings"], "keys": keys}
        ), "missing dict key 'labels'"
    if case == "extra dict key":
        return pickle.dumps(dict(d, extra=1)), "unexpected or repeated dict key 'extra'"
    if case == "inconsistent labels":
        labels = d["labels"].copy()
        labels[6] = 99
        return _encode(
            dict(d, labels=labels), "py2-bytes-keys"
        ), r"keys\[6\] .* has label 99 but keys\[4\]"
    if case == "nan embedding":
        emb = d["embeddings"].copy()
        emb[3, 100] = np.nan
        message = r"'embeddings' has a NaN or infinite value in row 3 \(id 'train-n011-n011_0003"
        return _encode(dict(d, embeddings=emb), "py2-bytes-keys"), message
    if case == "not a dict":
        return pickle.dumps([1, 2]), "expected a dict, got list"
    if case == "class shared with val":
        keys = [k.replace("n013", "n021") for k in keys]
        return _encode(dict(d, keys=keys), "py3-str-keys"), "class 'n021' is also in the val split"
    if case == "other width":
        return _encode(
            dict(d, embeddings=d["embeddings"][:, :64].copy()), "py2-bytes-keys"
        ), "width 64 but val has 640"
    raise AssertionError(case)


MALFORMED = [
    "key without dashes",
    "image of another class",
    "duplicate key",
    "duplicate image",
    "short keys",
    "short labels",
    "1-D embeddings",
    "int embeddings",
    "missing dict key",
    "extra dict key",
    "inconsistent labels",
    "nan embedding",
    "not a dict",
    "class shared with val",
    "other width",
]


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_train_file_is_refused_and_nothing_is_written(tmp_path, case):
    raw, message = _malformed(case)
    _tree(tmp_path / "emb", train=raw)
    out = tmp_path / "deep" / "out"
    with pytest.raises(LeoInputError, match=message) as info:
        import_published(tmp_path / "emb", "miniImageNet", "center", out)
    assert "train_embeddings.pkl: " in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "deep").exists()  # val.parquet was written to a temp file, then removed


def test_malicious_pickle_is_refused_with_nothing_written(tmp_path):
    marker = tmp_path / "pwned"
    evil = f"cos\nsystem\n(V touch {marker}\ntR.".encode()
    _tree(tmp_path / "emb", test=evil)  # the last file read: val and train are written by then
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(
        LeoInputError, match=r"test_embeddings\.pkl: refused to load global 'os\.system'"
    ):
        import_published(tmp_path / "emb", "miniImageNet", "center", out)
    assert not marker.exists()
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_dataset_view_and_file_names(tmp_path):
    _tree(tmp_path, dataset="tieredImageNet", view="multiview")
    with pytest.raises(LeoInputError, match="unknown view 'multiview' for tieredImageNet"):
        import_published(tmp_path, "tieredImageNet", "multiview", tmp_path / "out")
    with pytest.raises(LeoInputError, match="unknown dataset 'omniglot'"):
        read_published_split(tmp_path, "omniglot", "center", "train")
    with pytest.raises(LeoInputError, match="unknown split 'trainval'"):
        read_published_split(tmp_path, "miniImageNet", "center", "trainval")
    with pytest.raises(
        LeoInputError, match=r"miniImageNet/multiview/train_embeddings\.pkl: no such file"
    ):
        import_published(tmp_path, "miniImageNet", "multiview", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    _tree(tmp_path, view="multiview")
    out = import_published(tmp_path, "miniImageNet", "multiview", tmp_path / "out")
    assert all(os.path.isfile(p) for p in out.values())
