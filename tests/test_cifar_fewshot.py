"""CIFAR-FS and FC100 from CIFAR-100's python archive, on small archives generated in exactly its
format: ``cifar-100-python/{train,test,meta}``, Python 2 (cPickle protocol 2) dicts with the same
keys and dtypes; the class splits of the published split files; every malformed case refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import pickletools
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from leo.data.raw.cifar import load_class_split
from leo.data.raw.images import RawFiles
from leo.data.raw.readers import DEFAULT_SPLIT_FILES, read_raw
from leo.utils.errors import LeoInputError

REPO = Path(__file__).resolve().parents[1]
FC100 = json.loads(DEFAULT_SPLIT_FILES["fc100"].read_text())
COARSE = sorted(FC100["classes"])  # CIFAR-100's meta lists both name lists alphabetically
FINE = sorted(f for fs in FC100["classes"].values() for f in fs)
PARENT = {f: c for c, fs in FC100["classes"].items() for f in fs}
PER_SOURCE = {"train": 3, "test": 1}  # images per class in each file (the real: 500 and 100)
OPTS = {"image_size": (32, 32), "channels": 3, "min_classes": 5, "min_images": 4}


class Py2Pickler(pickle._Pickler):
    """Writes what CPython 2's cPickle writes at protocol 2: text and bytes as Python 2 ``str``
    (SHORT_BINSTRING / BINSTRING), numpy under its numpy 1 name ``numpy.core``."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def pixel(fine: int, source: str, i: int) -> np.ndarray:
    """A (32, 32, 3) image whose red is its class, green its file, blue its row (checkable)."""
    img = np.empty((32, 32, 3), dtype=np.uint8)
    img[..., 0] = 2 * fine
    img[..., 1] = 50 if source == "train" else 150
    img[..., 2] = i % 256
    img[0, 0] = (7, 11, 13)  # a corner that shows a wrong plane order or transpose
    return img


def contents(edit=None) -> dict[str, dict]:
    """The three dicts, as in the real archive (classes interleaved in each file)."""
    out = {"meta": {"fine_label_names": list(FINE), "coarse_label_names": list(COARSE)}}
    for source, per in PER_SOURCE.items():
        fine = [f for _ in range(per) for f in range(len(FINE))]
        images = np.stack([pixel(f, source, i) for i, f in enumerate(fine)])
        out[source] = {
            "batch_label": f"{'training' if source == 'train' else 'testing'} batch 1 of 1",
            "filenames": [f"img_{source}_{i:05d}.png" for i in range(len(fine))],
            "fine_labels": fine,
            "coarse_labels": [COARSE.index(PARENT[FINE[f]]) for f in fine],
            "data": images.transpose(0, 3, 1, 2).reshape(len(fine), 3072),  # R, G, B planes
        }
    if edit is not None:
        edit(out)
    return out


def write_archive(root: Path, edit=None, dumps=py2_dumps, name="cifar-100-python.tar.gz") -> str:
    """``cifar-100-python.tar.gz`` as the CIFAR page ships it; returns its file name."""
    with tarfile.open(root / name, "w:gz") as t:
        for member, obj in contents(edit).items():
            data = dumps(obj) if isinstance(obj, dict) else obj
            info = tarfile.TarInfo(f"cifar-100-python/{member}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return name


def read(root: Path, entries: list[str], dataset="cifar-fs", **opts):
    with RawFiles(root, entries) as raw:
        return read_raw(dataset, raw, **{**OPTS, **opts})


def test_generated_pickles_are_python2_protocol2_like_the_real_ones():
    data = py2_dumps(contents()["train"])
    ops = [op.name for op, _, _ in pickletools.genops(data)]
    assert data[:2] == b"\x80\x02" and "BINUNICODE" not in ops and "BINBYTES" not in ops
    assert "SHORT_BINSTRING" in ops and "BINSTRING" in ops  # keys, and the 3072-byte rows
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data


@pytest.mark.parametrize("dumps", [py2_dumps, lambda o: pickle.dumps(o, protocol=4)])
def test_cifar_fs_splits_classes_and_pixels(tmp_path, dumps):
    splits, meta = read(tmp_path, [write_archive(tmp_path, dumps=dumps)])
    spec = json.loads(DEFAULT_SPLIT_FILES["cifar-fs"].read_text())
    assert {s: len(v.classes) for s, v in splits.items()} == {"train": 64, "val": 16, "test": 20}
    assert meta["split_source"].startswith("Bertinetto") and meta["unused_classes"] == []
    for split, s in splits.items():
        assert s.classes == sorted(spec["splits"][split])
        assert s.images.shape == (4 * len(s.classes), 32, 32, 3)
        assert np.bincount(s.labels).tolist() == [4] * len(s.classes)
        for img, label, ident in zip(s.images, s.labels, s.ids, strict=True):
            source, row = ident.split("_")
            np.testing.assert_array_equal(
                img, pixel(FINE.index(s.classes[label]), source, int(row))
            )


def test_fc100_splits_by_superclass(tmp_path):
    splits, meta = read(tmp_path, [write_archive(tmp_path)], dataset="fc100")
    assert {s: len(v.classes) for s, v in splits.items()} == {"train": 60, "val": 20, "test": 20}
    for split, s in splits.items():
        supers = {PARENT[c] for c in s.classes}
        assert supers == set(FC100["splits"][split])
    assert meta["split_name"] == "fc100" and "TADAM" in meta["split_source"]


def test_resized_and_grey_on_request(tmp_path):
    splits, _ = read(tmp_path, [write_archive(tmp_path)], image_size=(16, 16), channels=1)
    assert splits["val"].images.shape == (64, 16, 16, 1)


def test_split_files_cite_their_source_and_partition_cifar100():
    fs, fc = (load_class_split(DEFAULT_SPLIT_FILES[d]) for d in ("cifar-fs", "fc100"))
    assert sorted(c for names in fs.splits.values() for c in names) == FINE
    assert sorted(c for names in fc.splits.values() for c in names) == COARSE
    assert "ICLR 2019" in fs.source and "NeurIPS 2018" in fc.source


def _refused(tmp_path, edit, needle, dataset="cifar-fs", **opts):
    entries = [write_archive(tmp_path, edit)]
    with pytest.raises(LeoInputError, match=needle):
        read(tmp_path, entries, dataset=dataset, **opts)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda o: o["train"].pop("fine_labels"),
            r"cifar-100-python/train: missing key 'fine_labels'",
        ),
        (
            lambda o: o["test"].update(data=o["test"]["data"].astype(np.float32)),
            r"cifar-100-python/test: key 'data': expected uint8 \(n, 3072\), got float32",
        ),
        (
            lambda o: o["train"].update(data=o["train"]["data"][:, :3071]),
            r"key 'data': expected uint8 \(n, 3072\), got uint8 \(300, 3071\)",
        ),
        (
            lambda o: o["train"]["fine_labels"].__setitem__(5, 100),
            r"cifar-100-python/train: key 'fine_labels': labels outside 0\.\.99",
        ),
        (
            lambda o: o["test"]["coarse_labels"].pop(),
            r"cifar-100-python/test: key 'coarse_labels': 99 labels for 100 images",
        ),
        (
            lambda o: o["meta"].pop("coarse_label_names"),
            r"cifar-100-python/meta: missing key 'coarse_label_names'",
        ),
        (
            lambda o: o["meta"]["fine_label_names"].__setitem__(1, "apple"),
            r"cifar-100-python/meta: key 'fine_label_names': names must be distinct",
        ),
        (
            lambda o: o["train"]["coarse_labels"].__setitem__(0, 19),
            r"class 'apple' has images labelled with two superclasses",
        ),
    ],
)
def test_malformed_archives_are_refused_naming_file_and_key(tmp_path, edit, needle):
    _refused(tmp_path, edit, needle)


def test_a_class_with_too_few_images_is_refused(tmp_path):
    _refused(
        tmp_path,
        None,
        r"CIFAR-100 \(cifar_fs\.json\): class '\w+' \(split 'train'\) has 4 images, fewer than "
        r"prepare\.min_images_per_class = 5",
        min_images=5,
    )


def test_a_superclass_that_disagrees_with_fc100_json_is_refused(tmp_path):
    def swap(o):  # relabel every 'apple' image as a 'fish'
        for source in ("train", "test"):
            d = o[source]
            d["coarse_labels"] = [
                COARSE.index("fish") if FINE[f] == "apple" else c
                for f, c in zip(d["fine_labels"], d["coarse_labels"], strict=True)
            ]

    _refused(tmp_path, swap, r"fc100\.json: key 'classes\.fish' lists \[.*\], the archive", "fc100")


class _Payload:
    """Unpickling this would create a directory: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_code_executing_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    entries = [
        write_archive(
            tmp_path,
            lambda o: o["meta"].update(fine_label_names=_Payload(marker)),
            dumps=lambda o: pickle.dumps(o, protocol=2),
        )
    ]
    with pytest.raises(
        LeoInputError, match=rf"cifar-100-python/meta: refused .*{os.mkdir.__module__}"
    ):
        read(tmp_path, entries)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda s: s["splits"]["test"].append("unicorn"),
            r"class 'unicorn' \(split 'test'\) is not in",
        ),
        (lambda s: s.pop("source"), r"key 'source' must cite where the split comes from"),
        (
            lambda s: s["splits"]["val"].append("apple"),
            r"'apple' is in both split 'train' and split 'val'",
        ),
        (lambda s: s.update(by="alphabet"), r"key 'by' must be 'class' or 'superclass'"),
    ],
)
def test_bad_split_files_are_refused(tmp_path, change, needle):
    spec = json.loads(DEFAULT_SPLIT_FILES["cifar-fs"].read_text())
    if "apple" not in spec["splits"]["train"]:  # the test needs 'apple' in train
        spec["splits"]["train"].append("apple")
    change(spec)
    path = tmp_path / "split.json"
    path.write_text(json.dumps(spec))
    entries = [write_archive(tmp_path)]
    with pytest.raises(LeoInputError, match=needle):
        read(tmp_path, entries, split_file=path)


def test_download_and_prepare_stages_with_the_repository_params(tmp_path, monkeypatch):
    """The params.yaml entries of cifar-fs (URL, sha256 pin, split file, 32x32) drive the real
    download and prepare stages; only the sha256 is replaced by the generated archive's."""
    from leo.data.prepared import load_manifest
    from leo.settings import parse_settings, read_yaml
    from stages import download, prepare

    data_dir = tmp_path / "data"
    (data_dir / "cifar100").mkdir(parents=True)
    name = write_archive(data_dir / "cifar100")
    doc = read_yaml(REPO / "params.yaml")
    entry = doc["download"]["cifar-fs"]["files"][0]
    assert entry["url"] == "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    assert entry["sha256"] == "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
    entry["sha256"] = hashlib.sha256((data_dir / "cifar100" / name).read_bytes()).hexdigest()
    doc["base"]["dataset"] = "cifar-fs"
    doc["download"]["partial_dir"] = str(tmp_path / "partial")
    doc["prepare"]["min_images_per_class"] = 4
    params = parse_settings(doc)
    monkeypatch.chdir(REPO)  # the split file path is relative to the repository
    download.run(params, out=tmp_path / "raw", data_dir=data_dir)
    meta = prepare.run(params, raw=tmp_path / "raw", out=tmp_path / "prepared")
    manifest = load_manifest(tmp_path / "prepared")
    assert meta["dataset"] == "cifar-fs" and manifest["image_size"] == [32, 32]
    assert manifest["split_file"] == "leo/data/splits/cifar_fs.json"
    assert {s: len(v["classes"]) for s, v in manifest["splits"].items()} == {
        "train": 64,
        "val": 16,
        "test": 20,
    }


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (
            lambda d: d["prepare"]["cifar-fs"].update(channels=2),
            r"prepare\.cifar-fs\.channels: must be 1 or 3",
        ),
        (
            lambda d: d["pretrain"]["fc100"].update(depth=11),
            r"pretrain\.fc100: depth must be 6n \+ 4",
        ),
        (lambda d: d["download"].update(cifar_fs={}), r"download\.cifar_fs: unknown key"),
        (
            lambda d: d["base"].update(dataset="cifar"),
            r"base\.dataset: must be .*'cifar-fs' or 'fc100'",
        ),
    ],
)
def test_params_of_the_new_datasets_are_validated(change, needle):
    from leo.settings import parse_settings, read_yaml

    doc = read_yaml(REPO / "params.yaml")
    assert parse_settings(doc).pretrain_config("cifar-fs").strides == (1, 2, 2)
    change(doc)
    with pytest.raises(LeoInputError, match=needle):
        parse_settings(doc)
