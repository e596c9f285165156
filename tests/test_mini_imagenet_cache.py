"""miniImageNet's learn2learn/torchmeta pickles (``mini-imagenet-cache-<split>.pkl``), generated
in exactly that format: a dict of ``image_data`` uint8 (n, 84, 84, 3) and ``class_dict`` wnid ->
list of row indices; read through the restricted unpickler, every malformed case refused."""

from __future__ import annotations

import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from leo.data.raw.images import RawFiles
from leo.data.raw.readers import read_raw
from leo.utils.errors import LeoInputError

CLASSES = {
    split: [f"n0{k}{c:02d}0000" for c in range(5)]
    for k, split in enumerate(("train", "val", "test"))
}
PER_CLASS = 3
OPTS = {"image_size": (8, 8), "channels": 3, "min_classes": 5, "min_images": PER_CLASS}


def colour(split: str, c: int) -> np.ndarray:
    """A distinct solid colour per class, so a label can be checked against its pixels."""
    k = ("train", "val", "test").index(split)
    return np.array([40 + 50 * c, 60 + 80 * k, 200 - 30 * c], dtype=np.uint8)


def cache(split: str, names: list[str]) -> dict:
    """One split as learn2learn stores it; rows interleave the classes (class c at c, c+5, ...)."""
    n = len(names) * PER_CLASS
    images = np.empty((n, 84, 84, 3), dtype=np.uint8)
    class_dict = {}
    for c, wnid in enumerate(names):
        rows = [c + len(names) * i for i in range(PER_CLASS)]
        images[rows] = colour(split, c)
        class_dict[wnid] = rows
    return {"image_data": images, "class_dict": class_dict}


def write(root: Path, edit=None, form: str = "files", protocol: int = 4) -> list[str]:
    """Write the three pickles as loose files, a zip or a tar.gz; ``edit(split, obj)`` may
    change a split's dict first (a ``wrap`` key replaces the dict by its value)."""
    blobs = {}
    for split, names in CLASSES.items():
        obj = cache(split, names)
        if edit is not None:
            edit(split, obj)
        obj = obj.pop("wrap", obj)
        blobs[f"mini-imagenet-cache-{split}.pkl"] = pickle.dumps(obj, protocol=protocol)
    if form == "files":
        for name, data in blobs.items():
            (root / name).write_bytes(data)
        return sorted(blobs)
    if form == "zip":
        with zipfile.ZipFile(root / "mini.zip", "w") as z:
            for name, data in blobs.items():
                z.writestr(f"mini-imagenet/{name}", data)
        return ["mini.zip"]
    with tarfile.open(root / "mini.tar.gz", "w:gz") as t:
        for name, data in blobs.items():
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return ["mini.tar.gz"]


def read(root: Path, entries: list[str]):
    with RawFiles(root, entries) as raw:
        return read_raw("miniImageNet", raw, **OPTS)


@pytest.mark.parametrize(("form", "protocol"), [("files", 4), ("zip", 2), ("tar.gz", 5)])
def test_pickles_are_read_with_labels_matching_pixels(tmp_path, form, protocol):
    splits, meta = read(tmp_path, write(tmp_path, form=form, protocol=protocol))
    assert meta["format"] == "mini-imagenet-cache"
    assert meta["cache_files"]["val"].endswith("mini-imagenet-cache-val.pkl")
    for split, names in CLASSES.items():
        s = splits[split]
        assert s.classes == sorted(names)
        assert s.images.shape == (5 * PER_CLASS, 8, 8, 3)
        assert s.labels.tolist() == [c for c in range(5) for _ in range(PER_CLASS)]
        rows = [int(i.split("_")[1]) for i in s.ids]
        assert rows[:PER_CLASS] == [0, 5, 10]  # class 0's rows, in class_dict order
        for img, label in zip(s.images, s.labels, strict=True):
            expected = colour(split, names.index(s.classes[label])).astype(int)
            assert np.abs(img.reshape(-1, 3).astype(int) - expected).max() <= 1


def test_images_are_resized_like_the_csv_format(tmp_path):
    """84 -> 80 with PIL's Lanczos filter, the function the CSV + JPEG reader uses."""
    from PIL import Image

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)

    def edit(split, obj):
        obj["image_data"][0] = noise  # class 0's first row

    entries = write(tmp_path, edit)
    with RawFiles(tmp_path, entries) as raw:
        splits, _ = read_raw("miniImageNet", raw, **{**OPTS, "image_size": (80, 80)})
    expected = np.asarray(Image.fromarray(noise).resize((80, 80), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(splits["train"].images[0], expected)


def _refused(tmp_path, edit, needle):
    entries = write(tmp_path, edit)
    with pytest.raises(LeoInputError, match=needle):
        read(tmp_path, entries)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (
            lambda s, o: s == "val" and o.pop("class_dict"),
            r"mini-imagenet-cache-val\.pkl: missing key 'class_dict'",
        ),
        (
            lambda s, o: s == "train" and o.update(image_data=o["image_data"].astype(np.float32)),
            r"mini-imagenet-cache-train\.pkl: key 'image_data': expected uint8 \(n, 84, 84, 3\), "
            r"got float32",
        ),
        (
            lambda s, o: s == "test" and o.update(image_data=o["image_data"].transpose(0, 3, 1, 2)),
            r"mini-imagenet-cache-test\.pkl: key 'image_data': .* got uint8 \(15, 3, 84, 84\)",
        ),
        (
            lambda s, o: s == "train" and o["class_dict"]["n00000000"].append(99),
            r"train\.pkl: key 'class_dict\.n00000000': row 99 is outside 0\.\.14",
        ),
        (
            lambda s, o: s == "train" and o["class_dict"]["n00000000"].append(-1),
            r"key 'class_dict\.n00000000': row -1 is outside",
        ),
        (
            lambda s, o: s == "val" and o["class_dict"]["n01000000"].append(1),
            r"val\.pkl: key 'class_dict\.n01010000': row 1 is also listed under class "
            r"'n01000000'",
        ),
        (
            lambda s, o: s == "val" and o["class_dict"].update(n01000000=["0", "5"]),
            r"key 'class_dict\.n01000000': expected a list of integers",
        ),
        (
            lambda s, o: s == "test" and o["class_dict"].pop("n02000000"),
            r"test\.pkl: key 'class_dict': 3 rows of 'image_data' are in no class",
        ),
        (
            lambda s, o: s == "train" and o.update(wrap=[o["image_data"]]),
            r"train\.pkl: expected a dict with keys 'image_data' and 'class_dict', got list",
        ),
        (
            lambda s, o: (
                s == "test" and o["class_dict"].update(n02000000=[0, 5], n02010000=[1, 6, 11, 10])
            ),
            r"class 'n02000000' \(split 'test'\) has 2 images, fewer than "
            r"prepare\.min_images_per_class = 3",
        ),
        (
            lambda s, o: s == "test" and o.update(class_dict={"n00000000": list(range(15))}),
            r"class 'n00000000' is in both split 'train' and split 'test'",
        ),
    ],
)
def test_malformed_pickles_are_refused_naming_file_and_key(tmp_path, edit, needle):
    _refused(tmp_path, edit, needle)


class _Payload:
    """Unpickling this would create a directory: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_code_executing_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    def edit(split, obj):
        if split == "val":
            obj["class_dict"]["n01000000"] = _Payload(marker)

    _refused(tmp_path, edit, rf"mini-imagenet-cache-val\.pkl: refused .*{os.mkdir.__module__}")
    assert not marker.exists()


def test_both_formats_at_once_are_refused(tmp_path):
    entries = write(tmp_path)
    (tmp_path / "train.csv").write_text("filename,label\n")
    with pytest.raises(LeoInputError, match="both mini-imagenet-cache-<split>.pkl and <split>.csv"):
        read(tmp_path, [*entries, "train.csv"])


def test_a_missing_split_pickle_is_named(tmp_path):
    entries = write(tmp_path)
    entries.remove("mini-imagenet-cache-test.pkl")
    with pytest.raises(LeoInputError, match=r"mini-imagenet-cache-test\.pkl: not found"):
        read(tmp_path, entries)
