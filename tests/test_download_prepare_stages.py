"""The `download` and `prepare` stages end to end: real Omniglot data, subprocesses, bad input."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from shared_data import REPO
from shared_data import SHARED_DATA as SHARED

import stages.download as download
import stages.prepare as prepare
from leo.data.prepared import load_manifest, load_prepared_split
from leo.settings import parse_settings, read_yaml
from leo.utils.errors import LeoInputError
from leo.utils.hashing import tree_sha256

SMALL = {  # the sha256 of the two small background archives (data README)
    "images_background_small1.zip": "f38eb80f801274ac2b4dff5b2428901"
    "6bfaba4a7d5bb50deebf27104ad6cb8a4",
    "images_background_small2.zip": "3ccaa407515a8778e5d0861875af38b"
    "17e418f301ad5bb3b5a6b65d901a41c7f",
}
SPLIT_FILE = REPO / "leo" / "data" / "splits" / "omniglot_small.json"

pytestmark = pytest.mark.skipif(
    not (SHARED / "omniglot" / "images_background_small1.zip").is_file(),
    reason="real Omniglot data not available",
)


def repo_params() -> dict:
    """The repository's params.yaml as a dict (every section: the stages validate them all)."""
    return copy.deepcopy(read_yaml(REPO / "params.yaml"))


def write_params(root: Path, params: dict) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def stage(name: str, cwd: Path, *args: str, env: dict | None = None):
    environ = {k: v for k, v in os.environ.items() if k not in ("LEO_DATA_DIR", "LEO_PARAMS")}
    environ.update(PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args],
        cwd=cwd,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )


def leftovers(data: Path) -> list[str]:
    """Temporary files or folders the stages may have left under ``data/``."""
    return sorted(p.name for p in data.iterdir() if p.name.startswith(".")) if data.exists() else []


def tiny_omniglot(path: Path) -> str:
    """5 characters of 3 real alphabets from the small1 archive; returns the zip's sha256."""
    keep = ("Korean", "Balinese", "Early_Aramaic")
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        zipfile.ZipFile(SHARED / "omniglot" / "images_background_small1.zip") as src,
        zipfile.ZipFile(path, "w") as dst,
    ):
        for name in src.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[1] in keep and parts[2] <= "character05":
                dst.writestr(name, src.read(name))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_params(root: Path, sha: str) -> dict:
    split = root / "split.json"
    split.write_text(
        json.dumps(
            {"splits": {"train": ["Korean"], "val": ["Balinese"], "test": ["Early_Aramaic"]}}
        )
    )
    params = repo_params()
    params["download"]["omniglot"]["files"] = [{"name": "tiny.zip", "sha256": sha}]
    params["prepare"]["omniglot"]["split_file"] = str(split)
    return params


def test_full_default_omniglot_through_both_stages(tmp_path):
    params = repo_params()
    params["prepare"]["omniglot"]["split_file"] = str(SPLIT_FILE)
    work = write_params(tmp_path / "work", params)
    done = stage("download", work, "--data-dir", str(SHARED))
    assert done.returncode == 0, done.stderr
    source = json.loads((work / "data/raw/SOURCE.json").read_text())
    assert {f["name"]: f["sha256"] for f in source["files"]} == SMALL
    for name in SMALL:
        assert not (work / "data/raw" / name).is_symlink()
    done = stage("prepare", work)
    assert done.returncode == 0, done.stderr
    manifest = load_manifest(work / "data/prepared")
    assert manifest["dataset"] == "omniglot"
    assert manifest["image_size"] == [28, 28] and manifest["channels"] == 1
    counts = {s: (len(v["classes"]), v["num_images"]) for s, v in manifest["splits"].items()}
    assert counts == {"train": (153, 3060), "val": (41, 820), "test": (48, 960)}
    assert manifest["split_file_sha256"] == hashlib.sha256(SPLIT_FILE.read_bytes()).hexdigest()
    assert {s["name"]: s["sha256"] for s in manifest["sources"]} == SMALL
    test = load_prepared_split(work / "data/prepared", "test")
    assert test.images.shape == (960, 28, 28, 1)
    assert np.bincount(test.labels).tolist() == [20] * 48
    assert leftovers(work / "data") == []


def test_tiny_subset_in_process_with_env_data_dir(tmp_path, monkeypatch):
    sha = tiny_omniglot(tmp_path / "shared" / "omniglot" / "tiny.zip")
    params = tiny_params(tmp_path, sha)
    monkeypatch.chdir(tmp_path)
    params["download"]["partial_dir"] = str(tmp_path / "partial")
    download.run(parse_settings(params), out="raw", data_dir=tmp_path / "shared")
    meta = prepare.run(parse_settings(params), raw="raw", out="prepared")
    assert meta["alphabets"] == {
        "train": {"Korean": 5},
        "val": {"Balinese": 5},
        "test": {"Early_Aramaic": 5},
    }
    val = load_prepared_split("prepared", "val")
    assert val.classes[0] == "Balinese/character01" and val.images.shape == (100, 28, 28, 1)


def test_tiny_subset_subprocess_with_env_then_tampered_raw_file(tmp_path):
    sha = tiny_omniglot(tmp_path / "shared" / "omniglot" / "tiny.zip")
    work = write_params(tmp_path / "work", tiny_params(tmp_path, sha))
    done = stage("download", work, env={"LEO_DATA_DIR": str(tmp_path / "shared")})
    assert done.returncode == 0, done.stderr
    assert (work / "data/raw/tiny.zip").read_bytes() == (
        tmp_path / "shared/omniglot/tiny.zip"
    ).read_bytes()
    with open(work / "data/raw/tiny.zip", "ab") as f:
        f.write(b"\0")
    done = stage("prepare", work)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") and len(done.stderr.strip().splitlines()) == 1
    assert f"tiny.zip: sha256 mismatch: expected {sha}, got " in done.stderr
    assert not (work / "data/prepared").exists()


def test_download_checksum_mismatch_exits_nonzero_and_writes_nothing(tmp_path):
    params = repo_params()
    params["download"]["omniglot"]["files"][0]["sha256"] = "0" * 64
    work = write_params(tmp_path / "work", params)
    done = stage("download", work, "--data-dir", str(SHARED))
    assert done.returncode == 2
    line = done.stderr.strip()
    assert "images_background_small1.zip: sha256 mismatch" in line
    assert "0" * 64 in line and SMALL["images_background_small1.zip"] in line
    assert not (work / "data/raw").exists() and leftovers(work / "data") == []


def test_prepare_names_a_corrupt_archive(tmp_path):
    work = write_params(tmp_path / "work", repo_params())
    raw = work / "data/raw"
    raw.mkdir(parents=True)
    bad = (SHARED / "omniglot" / "images_background_small1.zip").read_bytes()[:20000]
    (raw / "images_background_small1.zip").write_bytes(bad)
    files = [{"name": "images_background_small1.zip", "sha256": hashlib.sha256(bad).hexdigest()}]
    (raw / "SOURCE.json").write_text(json.dumps({"dataset": "omniglot", "files": files}))
    done = stage("prepare", work)
    assert done.returncode == 2
    assert "images_background_small1.zip: not a readable zip archive" in done.stderr
    assert not (work / "data/prepared").exists()


def test_prepare_names_a_malformed_params_key_in_a_subprocess(tmp_path):
    params = repo_params()
    params["prepare"]["min_images_per_class"] = "twenty"
    done = stage("prepare", write_params(tmp_path / "work", params))
    assert done.returncode == 2
    assert "prepare.min_images_per_class: must be a valid integer (got 'twenty')" in done.stderr


@pytest.mark.parametrize(
    ("section", "edit", "needle"),
    [
        (
            "prepare",
            lambda p: p["prepare"].update(min_classes_per_split=0),
            r"prepare\.min_classes_per_split: must be greater than or equal to 1",
        ),
        (
            "prepare",
            lambda p: p["prepare"]["omniglot"].update(image_size=[28]),
            r"prepare\.omniglot\.image_size: ",
        ),
        ("prepare", lambda p: p["prepare"]["omniglot"].update(channels=2), r"channels: must be 1"),
        (
            "prepare",
            lambda p: p["prepare"].update(min_image_per_class=3),
            r"prepare\.min_image_per_class: unknown key",
        ),
        ("prepare", lambda p: p["base"].update(dataset="imagenet"), r"base\.dataset: must be"),
        ("download", lambda p: p["download"].update(retries=-1), r"download\.retries: must be"),
        ("download", lambda p: p["download"].update(timeout_s="1m"), r"download\.timeout_s: "),
        (
            "download",
            lambda p: p["base"].update(dataset="miniImageNet"),
            r"download\.miniImageNet\.files: must list at least one file",
        ),
    ],
)
def test_malformed_params_keys_are_named(tmp_path, section, edit, needle):
    params = repo_params()
    edit(params)
    with pytest.raises(LeoInputError, match=needle):
        if section == "prepare":
            prepare.run(parse_settings(params), raw=tmp_path / "raw", out=tmp_path / "out")
        else:
            download.run(parse_settings(params), out=tmp_path / "out", data_dir=None)
    assert not (tmp_path / "out").exists()


def test_mini_imagenet_folder_through_both_stages_in_process(tmp_path, monkeypatch):
    """A local miniImageNet folder (CSVs + images/) is copied, hashed as a tree, prepared."""
    tree = tmp_path / "shared" / "miniImageNet" / "mini"
    (tree / "images").mkdir(parents=True)
    for k, split in enumerate(("train", "val", "test")):
        rows = ["filename,label"]
        for c in range(5):
            for i in range(2):
                name = f"n{k}{c}{i:08d}.jpg"
                rows.append(f"{name},n{k}{c}")
                Image.new("RGB", (12, 10), (50 * c, 9, 9)).save(tree / "images" / name)
        (tree / f"{split}.csv").write_text("\n".join(rows) + "\n")
    params = repo_params()
    params["base"]["dataset"] = "miniImageNet"
    params["download"]["miniImageNet"]["files"] = [{"name": "mini", "sha256": tree_sha256(tree)}]
    params["prepare"]["min_images_per_class"] = 2
    monkeypatch.chdir(tmp_path)
    download.run(parse_settings(params), out="raw", data_dir="shared")
    prepare.run(parse_settings(params), raw="raw", out="prepared")
    manifest = load_manifest("prepared")
    assert manifest["image_size"] == [80, 80] and manifest["channels"] == 3
    assert manifest["splits"]["val"] == {"classes": [f"n1{c}" for c in range(5)], "num_images": 10}
    assert manifest["sources"] == [{"name": "mini", "sha256": tree_sha256(tree)}]


def test_prepare_refuses_raw_data_of_another_dataset(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "SOURCE.json").write_text(json.dumps({"dataset": "omniglot", "files": []}))
    params = repo_params()
    params["base"]["dataset"] = "tieredImageNet"
    with pytest.raises(
        LeoInputError, match=r"holds 'omniglot' but base\.dataset is 'tieredImageNet'"
    ):
        prepare.run(parse_settings(params), raw=raw, out=tmp_path / "out")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_malicious_tiered_pickle_through_both_stages_writes_nothing(tmp_path):
    """Tiny tieredImageNet pickles, one hostile, from a local dir: prepare refuses it."""
    src = tmp_path / "shared" / "tieredImageNet"
    src.mkdir(parents=True)
    marker = tmp_path / "pwned"
    png = io.BytesIO()
    Image.new("RGB", (84, 84), (10, 20, 30)).save(png, format="PNG")
    entries = []
    for k, split in enumerate(("train", "val", "test")):
        names = [f"n{k}{c}" for c in range(5)]
        labels = {
            "label_specific": np.repeat(np.arange(5), 20),
            "label_general": np.zeros(100, dtype=np.int64),
            "label_specific_str": names,
            "label_general_str": ["g"],
        }
        images = [np.frombuffer(png.getvalue(), dtype=np.uint8)] * 100
        if split == "val":
            images = [_Payload(marker)]
        for name, obj in ((f"{split}_labels.pkl", labels), (f"{split}_images_png.pkl", images)):
            (src / name).write_bytes(pickle.dumps(obj))
            entries.append(
                {"name": name, "sha256": hashlib.sha256((src / name).read_bytes()).hexdigest()}
            )
    params = repo_params()
    params["base"]["dataset"] = "tieredImageNet"
    params["download"]["tieredImageNet"]["files"] = entries
    work = write_params(tmp_path / "work", params)
    done = stage("download", work, "--data-dir", str(tmp_path / "shared"))
    assert done.returncode == 0, done.stderr
    done = stage("prepare", work)
    assert done.returncode == 2
    assert "val_images_png.pkl: refused" in done.stderr
    assert not marker.exists()
    assert not (work / "data/prepared").exists() and leftovers(work / "data") == []
