"""Bad input, stage by stage: one line naming the file, key or class; exit 2; nothing written.

Each test feeds exactly one bad input to a real stage (a subprocess where the exit code and
stderr matter, in-process otherwise) in a scratch directory holding the repository's
params.yaml, and checks the message, the exit status and that no output appeared.
"""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from shared_data import REPO

from leo.core.config import make_config
from leo.data.store import write_embeddings
from leo.data.synthetic import synthetic_split
from leo.meta.train import meta_train
from leo.settings import parse_settings, read_yaml
from leo.utils.atomic import atomic_dir
from leo.utils.errors import LeoInputError
from stages import evaluate as evaluate_stage
from stages import metatrain as metatrain_stage

PARAMS = read_yaml(REPO / "params.yaml")


def params_with(**dotted) -> dict:
    doc = copy.deepcopy(PARAMS)
    for key, value in dotted.items():
        *parents, leaf = key.split("__")
        node = doc
        for part in parents:
            node = node[part]
        node[leaf] = value
    return doc


def run_stage(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LEO_DATA_DIR": str(cwd)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- params
GE1 = "must be greater than or equal to 1"


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("metatrain.common.num_steps", 0, f"metatrain.common.num_steps: {GE1} (got 0)"),
        ("metatrain.common.num_steps", -3, f"metatrain.common.num_steps: {GE1} (got -3)"),
        ("metatrain.common.validate_every", 0, f"metatrain.common.validate_every: {GE1} (got 0)"),
        (
            "metatrain.common.validate_every",
            -100,
            f"metatrain.common.validate_every: {GE1} (got -100)",
        ),
        ("metatrain.common.val_batches", 0, f"metatrain.common.val_batches: {GE1} (got 0)"),
        ("metatrain.common.val_batch_size", 0, f"metatrain.common.val_batch_size: {GE1} (got 0)"),
        ("pretrain.omniglot.epoch", 1, "pretrain.omniglot.epoch: unknown key"),
        (
            "metatrain.device",
            "gpu",
            "metatrain.device: must be auto, cpu, cuda or cuda:<index> (got 'gpu')",
        ),
    ],
)
def test_bad_params_stop_metatrain_in_one_line_writing_nothing(tmp_path, key, value, message):
    doc = params_with(**{key.replace(".", "__"): value})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    done = run_stage(tmp_path, "stages.metatrain", "1shot")
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"error: params.yaml: {message}"]
    assert files_under(tmp_path) == ["params.yaml"]


# ----------------------------------------------------------------------------- raw data
def test_a_corrupt_compressed_zip_member_is_named(tmp_path):
    """A zip whose directory is fine but one member's deflate stream is damaged."""
    alphabets = {"train": "Korean", "val": "Greek", "test": "Latin"}
    split_file = tmp_path / "split.json"
    split_file.write_text(
        json.dumps({"name": "t", "splits": {k: [v] for k, v in alphabets.items()}})
    )
    doc = params_with(
        prepare__min_images_per_class=2,
        prepare__min_classes_per_split=1,
        prepare__omniglot__split_file=str(split_file),
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    archive = raw / "images_background_small1.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for alphabet in alphabets.values():
            for i in range(2):
                name = f"images_background_small1/{alphabet}/character01/{i}.png"
                zf.writestr(name, bytes(range(256)) * 40)
    data = bytearray(archive.read_bytes())
    start = data.index(b"Korean/character01/0.png") + len("Korean/character01/0.png") + 8
    data[start : start + 32] = bytes(b ^ 0xFF for b in data[start : start + 32])
    archive.write_bytes(bytes(data))
    sha = hashlib.sha256(bytes(data)).hexdigest()
    source = {"dataset": "omniglot", "files": [{"name": archive.name, "sha256": sha}]}
    (raw / "SOURCE.json").write_text(json.dumps(source))
    done = run_stage(tmp_path, "stages.prepare")
    assert done.returncode == 2
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {archive.relative_to(tmp_path)}:images_background_small1/")
    assert "Korean/character01/0.png: cannot read (Error -3 while decompressing data" in line
    assert not (tmp_path / "data" / "prepared").exists()


# ----------------------------------------------------------------------------- evaluate
def _write_split(root: Path, split: str, classes: list[str], per_class: list[int], dim=16):
    rng = np.random.default_rng(len(split))
    names = np.repeat(classes, per_class)
    ids = np.array([f"{split}-{i}" for i in range(len(names))])
    write_embeddings(
        root / f"{split}.parquet",
        split=split,
        class_names=names,
        example_ids=ids,
        embeddings=rng.normal(size=(len(names), dim)).astype(np.float32),
        provenance={"test": True},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 1-shot LEO checkpoint on 16-d synthetic embeddings (a few steps)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = make_config(
        num_steps=2,
        validate_every=2,
        val_batches=1,
        val_batch_size=4,
        batch_size=2,
        compile=False,
        eval_per_class_total=600,
    )
    train = synthetic_split(8, 20, 16, seed=1, split="train")
    val = synthetic_split(6, 20, 16, seed=2, split="val")
    result = meta_train(cfg, train, val, root / "run", progress=False)
    return result.checkpoint


def _evaluate_project(tmp_path: Path, checkpoint: Path, test_counts: list[int]) -> Path:
    (tmp_path / "data" / "metatrain" / "1shot").mkdir(parents=True)
    (tmp_path / "data" / "metatrain" / "1shot" / "best.pt").write_bytes(checkpoint.read_bytes())
    emb = tmp_path / "emb"
    _write_split(emb, "train", [f"a{i}" for i in range(6)], [10] * 6)
    _write_split(emb, "val", [f"b{i}" for i in range(6)], [10] * 6)
    _write_split(emb, "test", [f"c{i}" for i in range(len(test_counts))], test_counts)
    return emb


def test_a_small_test_class_is_refused_below_the_query_minimum(tmp_path, monkeypatch, trained):
    emb = _evaluate_project(tmp_path, trained, [20, 20, 20, 20, 20, 3])
    monkeypatch.chdir(tmp_path)
    settings = parse_settings(params_with(evaluate__num_episodes=20, evaluate__batch_size=10))
    with pytest.raises(LeoInputError) as err:
        evaluate_stage.run("1shot", settings, emb)
    assert str(err.value) == (
        f"{emb / 'test.parquet'}: class 'c5' has 3 examples: 2 queries per class at 1-shot for "
        "every episode, fewer than evaluate.min_queries_per_class = 5"
    )
    assert not (tmp_path / "reports").exists() and not (tmp_path / "data" / "evaluate").exists()


def test_a_capped_query_count_is_said_in_the_metrics(tmp_path, monkeypatch, trained):
    emb = _evaluate_project(tmp_path, trained, [20, 20, 20, 20, 20, 8])
    monkeypatch.chdir(tmp_path)
    settings = parse_settings(params_with(evaluate__num_episodes=20, evaluate__batch_size=10))
    metrics = evaluate_stage.run("1shot", settings, emb)
    assert metrics["queries_per_class"] == 7
    assert metrics["queries"] == (
        "7 queries per class (capped by the smallest class 'c5' (8 examples))"
    )


def test_a_truncated_checkpoint_is_one_line_at_evaluate(tmp_path, trained):
    emb = _evaluate_project(tmp_path, trained, [20] * 6)
    best = tmp_path / "data" / "metatrain" / "1shot" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    done = run_stage(tmp_path, "stages.evaluate", "1shot", "--embeddings", str(emb))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: data/metatrain/1shot/best.pt: not a LEO checkpoint (RuntimeError)"
    ]
    assert not (tmp_path / "reports").exists() and not (tmp_path / "data" / "evaluate").exists()


@pytest.mark.parametrize(("split", "stage"), [("val", "metatrain"), ("test", "evaluate")])
def test_splits_sharing_a_class_are_refused(tmp_path, monkeypatch, trained, split, stage):
    emb = _evaluate_project(tmp_path, trained, [20] * 6)
    classes = ["a0", "b1", "b2", "b3", "b4", "b5"] if split == "val" else ["c0", "c1", "b2"]
    _write_split(emb, split, classes, [20] * len(classes))
    monkeypatch.chdir(tmp_path)
    settings = parse_settings(params_with(evaluate__num_episodes=20, evaluate__batch_size=10))
    module = metatrain_stage if stage == "metatrain" else evaluate_stage
    before = files_under(tmp_path)
    with pytest.raises(LeoInputError) as err:
        module.run("1shot", settings, emb)
    other = "train" if split == "val" else "val"
    assert str(err.value) == (
        f"{emb / f'{split}.parquet'}: class '{classes[0] if split == 'val' else 'b2'}' is also "
        f"in {emb / f'{other}.parquet'}; the splits must not share classes"
    )
    assert files_under(tmp_path) == before


# ----------------------------------------------------------------------------- kill -9
def test_temporaries_of_a_killed_write_are_cleared_before_the_next(tmp_path):
    out = tmp_path / "data" / "embeddings"
    stale = tmp_path / "data" / ".embeddings.k1ll3d.tmp"  # what a kill -9 mid-write leaves
    stale.mkdir(parents=True)
    (stale / ".train.parquet.x.tmp").write_bytes(b"half")
    with atomic_dir(out) as tmp:
        (tmp / "train.parquet").write_bytes(b"whole")
    assert files_under(tmp_path) == ["data/embeddings/train.parquet"]


def _compare_doc() -> dict:
    """params.yaml with a compare@1shot of a few seconds: LEO and one trained ablation."""
    doc = params_with(
        metatrain__common__num_steps=4,
        metatrain__common__validate_every=2,
        metatrain__common__val_batches=1,
        metatrain__common__val_batch_size=4,
        metatrain__common__batch_size=2,
        evaluate__num_episodes=20,
        evaluate__batch_size=10,
        compare__methods=["leo", "leo-deterministic"],
        compare__train_steps=4,  # params.yaml's 1000: the resume checks need no more than 4
        compare__num_episodes=20,
        compare__ensemble_episodes=0,
        compare__figure_episodes=0,
    )
    doc["tune"]["runs"] = {}  # no search: nothing tuned to read
    for run in doc["metatrain"]["runs"].values():
        run.pop("from_tune", None)
    return doc


def _compare_project(root: Path, params) -> Path:
    """Embeddings and a meta-trained data/metatrain/1shot/best.pt of ``params``' config."""
    emb = root / "emb"
    for split, prefix in (("train", "a"), ("val", "b"), ("test", "c")):
        _write_split(emb, split, [f"{prefix}{i}" for i in range(6)], [24] * 6)
    from leo.data.store import read_embeddings

    train, val = (read_embeddings(emb / f"{s}.parquet") for s in ("train", "val"))
    done = meta_train(params.run_config("1shot"), train, val, root / "mt", progress=False)
    best = root / "data" / "metatrain" / "1shot" / "best.pt"
    best.parent.mkdir(parents=True)
    best.write_bytes(done.checkpoint.read_bytes())
    return emb


def test_a_killed_compare_resumes_its_trainings_and_writes_the_same_bytes(
    tmp_path, monkeypatch, capsys
):
    from leo.comparison import compare as compare_module
    from stages import compare as compare_stage

    params = parse_settings(_compare_doc())
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for root in (whole, killed):
        _compare_project(root, params)
    monkeypatch.chdir(whole)
    compare_stage.run("1shot", params, whole / "emb")
    outs = {p: p.read_bytes() for p in sorted((whole / "data" / "compare").rglob("*.*"))}
    # only the outs: the trained method's best.pt and the accuracies, no resume state
    assert sorted(str(p.relative_to(whole)) for p in outs) == [
        "data/compare/1shot/accuracies.npz",
        "data/compare/1shot/leo-deterministic/best.pt",
    ]
    assert not (whole / "tmp" / "compare" / "1shot").exists()

    # "kill" after the trainings, before the scoring: the work stays, no outs appear
    monkeypatch.chdir(killed)

    def killed_here(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(compare_module, "score_methods", killed_here)
    with pytest.raises(KeyboardInterrupt):
        compare_stage.run("1shot", params, killed / "emb")
    work = killed / "tmp" / "compare" / "1shot"
    assert (work / "leo-deterministic" / "state.pt").is_file()
    assert not (killed / "data" / "compare").exists()
    monkeypatch.undo()
    monkeypatch.chdir(killed)
    capsys.readouterr()
    compare_stage.run("1shot", params, killed / "emb")
    assert f"compare 1shot: resuming the trainings of {Path('tmp/compare/1shot')}" in (
        capsys.readouterr().out
    )
    assert not work.exists()
    again = {p: p.read_bytes() for p in sorted((killed / "data" / "compare").rglob("*.*"))}
    assert [p.relative_to(killed) for p in again] == [p.relative_to(whole) for p in outs]
    assert list(again.values()) == list(outs.values())
