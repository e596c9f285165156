"""miniImageNet and tieredImageNet readers on tiny generated datasets in their exact formats."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from leo.data.raw.images import RawFiles
from leo.data.raw.mini_imagenet import read_mini_imagenet
from leo.data.raw.tiered_imagenet import read_tiered_imagenet
from leo.utils.errors import LeoInputError

CLASSES = {  # 3 disjoint splits of 5 classes; wnid-like names
    split: [f"n0{k}{c:02d}0000" for c in range(5)]
    for k, split in enumerate(("train", "val", "test"))
}
PER_CLASS = 3
OPTS = {"image_size": (8, 8), "channels": 3, "min_classes": 5, "min_images": PER_CLASS}


def colour(split: str, c: int) -> tuple[int, int, int]:
    """A distinct solid colour per class, so a label can be checked against its pixels."""
    k = ("train", "val", "test").index(split)
    return (40 + 50 * c, 60 + 80 * k, 200 - 30 * c)


def encode(rgb, fmt: str, size=(30, 21)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, format=fmt, quality=95)
    return buf.getvalue()


# --- miniImageNet -------------------------------------------------------------------------


def mini_files(classes=CLASSES) -> dict[str, bytes]:
    """The Ravi & Larochelle layout: <split>.csv (filename,label) + images/<file>.jpg."""
    files = {}
    for split, names in classes.items():
        rows = ["filename,label"]
        for c, wnid in enumerate(names):
            for i in range(PER_CLASS):
                fname = f"{wnid}{i + 1:08d}.jpg"
                rows.append(f"{fname},{wnid}")
                files[f"images/{fname}"] = encode(colour(split, c), "JPEG")
        files[f"{split}.csv"] = ("\n".join(rows) + "\n").encode()
    return files


def write_tree(files: dict[str, bytes], root: Path, form: str) -> str:
    """Write ``files`` as a folder, a zip or a tar.gz under ``root``; return the entry name."""
    if form == "dir":
        for name, data in files.items():
            (root / "mini" / name).parent.mkdir(parents=True, exist_ok=True)
            (root / "mini" / name).write_bytes(data)
        return "mini"
    if form == "zip":
        with zipfile.ZipFile(root / "mini.zip", "w") as z:
            for name, data in files.items():
                z.writestr(f"mini-imagenet/{name}", data)
        return "mini.zip"
    with tarfile.open(root / "mini.tar.gz", "w:gz") as t:
        for name, data in sorted(files.items(), reverse=True):  # storage order != sorted
            info = tarfile.TarInfo(f"./mini-imagenet/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return "mini.tar.gz"


@pytest.mark.parametrize("form", ["dir", "zip", "tar.gz"])
def test_mini_reads_every_form_with_labels_matching_pixels(tmp_path, form):
    entry = write_tree(mini_files(), tmp_path, form)
    with RawFiles(tmp_path, [entry]) as raw:
        splits, meta = read_mini_imagenet(raw, **OPTS)
    for split, names in CLASSES.items():
        s = splits[split]
        assert s.classes == sorted(names)
        assert s.images.shape == (5 * PER_CLASS, 8, 8, 3)
        assert np.bincount(s.labels).tolist() == [PER_CLASS] * 5
        for img, label, ident in zip(s.images, s.labels, s.ids, strict=True):
            assert ident.startswith(s.classes[label])  # the file name starts with its wnid
            expected = colour(split, names.index(s.classes[label]))
            assert np.abs(img.reshape(-1, 3).mean(0) - expected).max() < 4
    assert meta["split_csvs"]["val"].endswith("val.csv")


def test_mini_csvs_and_images_may_come_as_separate_raw_entries(tmp_path):
    files = mini_files()
    for split in CLASSES:
        (tmp_path / f"{split}.csv").write_bytes(files.pop(f"{split}.csv"))
    write_tree(files, tmp_path, "zip")
    with RawFiles(tmp_path, ["train.csv", "val.csv", "test.csv", "mini.zip"]) as raw:
        splits, _ = read_mini_imagenet(raw, **OPTS)
    assert len(splits["test"].ids) == 15


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda f: f.update({"val.csv": b"file,label\n"}), r"val\.csv: expected the header"),
        (lambda f: f.pop("images/n0100000000000002.jpg"), r"'n0100000000000002\.jpg' not found"),
        (
            lambda f: f.update({"images/n0100000000000002.jpg": b"\xff\xd8garbage"}),
            r"n0100000000000002\.jpg: cannot decode image",
        ),
        (
            lambda f: f.update({"test.csv": f["test.csv"].replace(b",n02000000", b",n00000000")}),
            r"class 'n00000000' is in both split 'train' and split 'test'",
        ),
        (
            lambda f: f.update({"train.csv": f["train.csv"] + b"n0100000000000001.jpg\n"}),
            r"train\.csv, line 17: expected 'filename,label'",
        ),
    ],
)
def test_mini_bad_input_is_named(tmp_path, change, needle):
    files = mini_files()
    change(files)
    entry = write_tree(files, tmp_path, "dir")
    with RawFiles(tmp_path, [entry]) as raw, pytest.raises(LeoInputError, match=needle):
        read_mini_imagenet(raw, **OPTS)


# --- tieredImageNet ----------------------------------------------------------------------


def tiered_files(classes=CLASSES, labels_edit=None) -> dict[str, bytes]:
    """Ren et al.'s pickles: PNG bytes as 1-D uint8 arrays, and the labels dict."""
    files = {}
    for split, names in classes.items():
        order = [c for _ in range(PER_CLASS) for c in range(len(names))]  # interleaved
        images = [
            np.frombuffer(encode(colour(split, c), "PNG", (84, 84)), dtype=np.uint8) for c in order
        ]
        labels = {
            "label_specific": np.array(order, dtype=np.int64),
            "label_general": np.zeros(len(order), dtype=np.int64),
            "label_specific_str": list(names),
            "label_general_str": ["group"],
        }
        if labels_edit is not None:
            labels_edit(split, labels)
        files[f"{split}_images_png.pkl"] = pickle.dumps(images, protocol=pickle.HIGHEST_PROTOCOL)
        files[f"{split}_labels.pkl"] = pickle.dumps(labels, protocol=2)
    return files


def _write_flat(files, root: Path) -> list[str]:
    for name, data in files.items():
        (root / name).write_bytes(data)
    return sorted(files)


def test_tiered_reads_pickles_with_labels_matching_pixels(tmp_path):
    with RawFiles(tmp_path, _write_flat(tiered_files(), tmp_path)) as raw:
        splits, _ = read_tiered_imagenet(raw, **OPTS)
    for split, names in CLASSES.items():
        s = splits[split]
        assert s.classes == names
        assert s.images.shape == (15, 8, 8, 3)
        assert s.ids[3] == f"{split}_000003"
        assert s.labels.tolist() == [c for _ in range(PER_CLASS) for c in range(5)]
        for img, label in zip(s.images, s.labels, strict=True):
            assert np.abs(img.reshape(-1, 3).mean(0) - colour(split, label)).max() <= 1


def test_tiered_reads_the_pickles_inside_a_tar(tmp_path):
    with tarfile.open(tmp_path / "tiered-imagenet.tar", "w") as t:
        for name, data in tiered_files().items():
            info = tarfile.TarInfo(f"tiered-imagenet/{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    with RawFiles(tmp_path, ["tiered-imagenet.tar"]) as raw:
        splits, _ = read_tiered_imagenet(raw, **OPTS)
    assert len(splits["train"].images) == 15


class _Payload:
    """Unpickling this would create a directory: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_tiered_pickle_is_refused_and_runs_nothing(tmp_path):
    files = tiered_files()
    marker = tmp_path / "pwned"
    files["val_images_png.pkl"] = pickle.dumps([_Payload(marker)])
    with RawFiles(tmp_path, _write_flat(files, tmp_path)) as raw:
        with pytest.raises(LeoInputError, match=r"val_images_png\.pkl: refused .*posix.*mkdir"):
            read_tiered_imagenet(raw, **OPTS)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda s, lab: (
                s == "val" and lab.update(label_specific_str=lab["label_specific_str"] + ["n09"])
            ),
            r"class 'n09' \(split 'val'\) has no images",
        ),
        (
            lambda s, lab: s == "test" and lab["label_specific_str"].__setitem__(0, "n00000000"),
            r"class 'n00000000' is in both split 'train' and split 'test'",
        ),
        (
            lambda s, lab: s == "train" and lab["label_specific"].__setitem__(0, 7),
            r"train_labels\.pkl: 'label_specific' has values outside 0\.\.4",
        ),
        (
            lambda s, lab: s == "train" and lab.pop("label_specific"),
            r"missing key 'label_specific'",
        ),
    ],
)
def test_tiered_bad_labels_are_named(tmp_path, edit, needle):
    with RawFiles(tmp_path, _write_flat(tiered_files(labels_edit=edit), tmp_path)) as raw:
        with pytest.raises(LeoInputError, match=needle):
            read_tiered_imagenet(raw, **OPTS)


def test_tiered_image_count_must_match_labels(tmp_path):
    files = tiered_files()
    files["test_images_png.pkl"] = pickle.dumps(pickle.loads(files["test_images_png.pkl"])[:-1])
    with RawFiles(tmp_path, _write_flat(files, tmp_path)) as raw:
        with pytest.raises(LeoInputError, match=r"test_images_png\.pkl: 14 images, but .* 15"):
            read_tiered_imagenet(raw, **OPTS)
