"""leo.data.raw.omniglot on tiny subsets of the real Omniglot archives (and their bad variants)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from shared_data import OMNIGLOT as REAL

from leo.data.raw.images import RawFiles
from leo.data.raw.omniglot import load_split_file, read_omniglot
from leo.utils.errors import LeoInputError

SMALL1 = REAL / "images_background_small1.zip"
SPLIT = {"train": ["Korean"], "val": ["Balinese"], "test": ["Early_Aramaic"]}

pytestmark = pytest.mark.skipif(not SMALL1.is_file(), reason="real Omniglot data not available")


def tiny_zip(
    path: Path,
    chars: int = 5,
    alphabets=("Korean", "Balinese", "Early_Aramaic"),
    root: str = "images_background_small1",
    edit=None,
) -> Path:
    """Copy ``chars`` characters of each alphabet from the real archive into a new zip.

    ``edit(name, data)`` may return changed bytes (or None to drop the file).
    """
    with zipfile.ZipFile(SMALL1) as src, zipfile.ZipFile(path, "w") as dst:
        for name in src.namelist():
            parts = name.split("/")
            if len(parts) < 4 or parts[1] not in alphabets:
                continue
            if int(parts[2].removeprefix("character")) > chars:
                continue
            data = src.read(name)
            if edit is not None and not name.endswith("/"):
                data = edit(name, data)
                if data is None:
                    continue
            dst.writestr(name.replace("images_background_small1", root, 1), data)
    return path


def split_file(path: Path, splits=None, characters=None) -> Path:
    spec = {"name": "tiny", "version": 3, "splits": splits or SPLIT}
    if characters is not None:
        spec["characters"] = characters
    path.write_text(json.dumps(spec))
    return path


def _read(tmp_path, names, splits=None, characters=None, **kw):
    kw.setdefault("min_images", 20)
    with RawFiles(tmp_path, names) as raw:
        return read_omniglot(raw, split_file(tmp_path / "split.json", splits, characters), **kw)


def test_tiny_subset_shapes_labels_ids_and_pixels(tmp_path):
    tiny_zip(tmp_path / "a.zip")
    splits, meta = _read(tmp_path, ["a.zip"], characters={a: 5 for a in sum(SPLIT.values(), [])})
    train = splits["train"]
    assert train.images.shape == (100, 28, 28, 1) and train.images.dtype == np.uint8
    assert train.classes == [f"Korean/character0{i}" for i in range(1, 6)]
    assert np.array_equal(train.labels, np.repeat(np.arange(5), 20))
    assert train.ids[0] == "Korean/character01/0" + train.ids[0].split("/0")[-1]
    assert len(set(train.ids)) == 100
    assert meta["alphabets"] == {
        "train": {"Korean": 5},
        "val": {"Balinese": 5},
        "test": {"Early_Aramaic": 5},
    }
    assert meta["unused_alphabets"] == []
    assert meta["split_version"] == 3 and len(meta["split_file_sha256"]) == 64
    # Antialiased downsizing keeps the ink fraction: compare with the 105x105 original.
    with zipfile.ZipFile(SMALL1) as z:
        member = next(n for n in z.namelist() if n.endswith(train.ids[0].split("/")[-1] + ".png"))
        original = np.asarray(Image.open(io.BytesIO(z.read(member))).convert("L"), dtype=float)
    assert original.shape == (105, 105) and set(np.unique(original)) == {0.0, 255.0}
    small = train.images[0, :, :, 0].astype(float)
    assert abs(small.mean() - original.mean()) < 4.0
    assert 0 < (small < 128).sum() < 28 * 28 / 2  # some ink, mostly paper


def test_drawings_in_two_archives_are_read_once(tmp_path):
    tiny_zip(tmp_path / "a.zip")
    tiny_zip(tmp_path / "b.zip", alphabets=("Korean",), root="images_background_small2")
    splits, meta = _read(
        tmp_path, ["a.zip", "b.zip"], {**SPLIT, "test": ["Balinese"], "val": []}, min_classes=0
    )
    assert len(splits["train"].images) == 100
    assert meta["unused_alphabets"] == ["Early_Aramaic"]


def test_the_same_drawing_with_different_bytes_is_refused(tmp_path):
    tiny_zip(tmp_path / "a.zip")
    tiny_zip(
        tmp_path / "b.zip",
        alphabets=("Korean",),
        root="other",
        edit=lambda name, data: data + b"\0",
    )
    with pytest.raises(LeoInputError, match=r"b\.zip:other/Korean/character0\d/.*\.png: differs"):
        _read(tmp_path, ["a.zip", "b.zip"])


def test_alphabet_in_two_splits_is_named(tmp_path):
    path = split_file(tmp_path / "s.json", {"train": ["Korean"], "val": ["Korean"], "test": []})
    with pytest.raises(LeoInputError, match=r"alphabet 'Korean' is in both split 'train' and "):
        load_split_file(path)


def test_missing_alphabet_and_wrong_character_count_are_named(tmp_path):
    tiny_zip(tmp_path / "a.zip")
    with pytest.raises(LeoInputError, match=r"alphabet 'Tagalog' \(split 'val'\) is not in"):
        _read(tmp_path, ["a.zip"], {**SPLIT, "val": ["Tagalog"]})
    with pytest.raises(LeoInputError, match=r"'Korean' has 5 characters .* records 40"):
        _read(tmp_path, ["a.zip"], characters={"Korean": 40})


def test_empty_character_is_named(tmp_path):
    tiny_zip(tmp_path / "a.zip", edit=lambda n, d: None if "Korean/character03/" in n else d)
    with pytest.raises(LeoInputError, match=r"class 'Korean/character03' \(split 'train'\) has no"):
        _read(tmp_path, ["a.zip"])


def test_too_few_drawings_and_too_few_characters_are_named_with_counts(tmp_path):
    tiny_zip(tmp_path / "a.zip", chars=4)
    with pytest.raises(LeoInputError, match=r"'Korean/character01' \(split 'train'\) has 20 .* 21"):
        _read(tmp_path, ["a.zip"], min_images=21, min_classes=4)
    with pytest.raises(LeoInputError, match=r"split 'train' has 4 classes, fewer than .* = 5"):
        _read(tmp_path, ["a.zip"], min_classes=5)


def test_undecodable_drawing_is_named(tmp_path):
    bad = "images_background_small1/Balinese/character02/0109_05.png"
    tiny_zip(tmp_path / "a.zip", edit=lambda n, d: b"not a png" if n == bad else d)
    with pytest.raises(LeoInputError, match=rf"a\.zip:{bad}: cannot decode image"):
        _read(tmp_path, ["a.zip"])


def test_corrupt_or_missing_archive_is_named(tmp_path):
    (tmp_path / "a.zip").write_bytes(SMALL1.read_bytes()[:5000])
    with pytest.raises(LeoInputError, match=r"a\.zip: not a readable zip archive"):
        _read(tmp_path, ["a.zip"])
    with pytest.raises(LeoInputError, match=r"b\.zip: not found"):
        _read(tmp_path, ["b.zip"])


def test_shipped_split_file_records_the_small_archives():
    spec = load_split_file("leo/data/splits/omniglot_small.json")
    assert sum(len(a) for a in spec.splits.values()) == 8
    assert sum(spec.characters.values()) == 242
    for split, n in {"train": 153, "val": 41, "test": 48}.items():
        assert sum(spec.characters[a] for a in spec.splits[split]) == n
