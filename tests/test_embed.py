"""Frozen embedding into the Parquet store: rows, classes, provenance, values, stage errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from leo.backbone.embed import embed_splits
from leo.backbone.wrn import WideResNet, WRNConfig, backbone_checkpoint, channel_stats, to_input
from leo.data.prepared import PreparedSplit, save_prepared
from leo.data.store import read_embeddings
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256
from stages import embed as embed_stage
from stages import pretrain as pretrain_stage

REPO = Path(__file__).resolve().parents[1]
SIZES = {"train": (4, 5), "val": (3, 4), "test": (3, 3)}  # split: (classes, images per class)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run best on one thread; two spin-wait badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_split(name: str, rng: np.random.Generator) -> PreparedSplit:
    """Random 12x12 grey images; labels interleaved so the input is not grouped by class."""
    c, k = SIZES[name]
    n = c * k
    labels = np.arange(n) % c
    return PreparedSplit(
        rng.integers(0, 256, (n, 12, 12, 1), dtype=np.uint8),
        labels,
        [f"{name}_class{i}" for i in range(c)],
        np.array([f"{name}/img{i:03d}" for i in range(n)]),
    )


@pytest.fixture()
def prepared(tmp_path) -> tuple[Path, dict[str, PreparedSplit]]:
    rng = np.random.default_rng(0)
    splits = {s: random_split(s, rng) for s in SIZES}
    meta = {"dataset": "omniglot", "split_file": "splits/x.json", "split_file_sha256": "ab" * 32}
    save_prepared(tmp_path / "prepared", splits, meta)
    return tmp_path / "prepared", splits


def save_backbone(prepared_root: Path, path: Path, images: np.ndarray) -> WideResNet:
    """An untrained WRN-10-1 with real BN statistics, saved as the pretrain stage would."""
    torch.manual_seed(0)
    model = WideResNet(WRNConfig(10, 1, (1, 2, 2), 0.0, 1, 4), *channel_stats(images))
    with torch.no_grad():
        model.train()(to_input(images))  # non-trivial running statistics
    sha = file_sha256(prepared_root / "manifest.json")
    torch.save(backbone_checkpoint(model, manifest_sha256=sha), path)
    return model.eval()


def test_embed_writes_every_split_equal_to_direct_features(prepared, tmp_path):
    root, splits = prepared
    model = save_backbone(root, tmp_path / "backbone.pt", splits["train"].images)
    info = embed_splits(root, tmp_path / "backbone.pt", tmp_path / "emb", batch_size=7)
    assert info["feature_dim"] == 64 and info["splits"] == {"train": 20, "val": 12, "test": 9}
    backbone_sha = file_sha256(tmp_path / "backbone.pt")
    for name, split in splits.items():
        got = read_embeddings(tmp_path / "emb" / f"{name}.parquet", normalize=False)
        assert got.split == name and len(got.example_ids) == len(split.ids)
        row = {str(i): r for r, i in enumerate(split.ids)}
        order = np.array([row[str(i)] for i in got.example_ids])  # the store groups by class
        assert sorted(order.tolist()) == list(range(len(split.ids)))
        names = [got.class_names[label] for label in got.labels.tolist()]
        assert names == [split.classes[split.labels[r]] for r in order]
        with torch.inference_mode():
            direct = model.features(to_input(split.images[order]))
        torch.testing.assert_close(got.embeddings, direct, rtol=1e-5, atol=1e-6)
        prov = got.provenance
        assert prov["dataset"] == "omniglot" and prov["split"] == name
        assert prov["split_file"] == "splits/x.json" and prov["split_file_sha256"] == "ab" * 32
        assert prov["prepared_file"] == f"{name}.npz"
        assert prov["prepared_sha256"] == file_sha256(root / f"{name}.npz")
        assert prov["backbone_sha256"] == backbone_sha and prov["feature_dim"] == 64
        assert prov["manifest_sha256"] == file_sha256(root / "manifest.json")
        normed = read_embeddings(tmp_path / "emb" / f"{name}.parquet").embeddings
        torch.testing.assert_close(normed.norm(dim=1), torch.ones(len(split.ids)))


def test_embed_refuses_a_backbone_of_another_dataset(prepared, tmp_path):
    root, splits = prepared
    save_backbone(root, tmp_path / "backbone.pt", splits["train"].images)
    save_prepared(root, {"train": splits["val"]}, {"dataset": "omniglot"})  # manifest changes
    with pytest.raises(LeoInputError, match="another prepared dataset"):
        embed_splits(root, tmp_path / "backbone.pt", tmp_path / "emb")
    assert not (tmp_path / "emb").exists()


def run_stage(cwd: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_pretrain_then_embed_stages_end_to_end(prepared, tmp_path, monkeypatch, capsys):
    """pretrain in-process, embed as ``python -m stages.embed``, then a missing backbone."""
    root, splits = prepared
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    root.rename(work / "data" / "prepared")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pretrain"].update(device="cpu", eval_batch_size=8)
    params["pretrain"]["omniglot"].update(depth=10, width=1, epochs=2, batch_size=8)
    params["embed"].update(device="cpu", batch_size=8)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(work)

    pretrain_stage.main()
    metrics = json.loads((work / "reports/pretrain/metrics.json").read_text())
    keys = {"backbone_heldout_accuracy", "backbone_train_accuracy", "epochs", "wall_seconds"}
    assert keys | {"num_classes", "feature_dim"} <= metrics.keys()
    assert (metrics["epochs"], metrics["num_classes"], metrics["feature_dim"]) == (2, 4, 64)
    history = (work / "reports/pretrain/plots/metrics/heldout_acc.tsv").read_text().splitlines()
    assert history[0] == "step\theldout_acc" and len(history) == 3  # DVCLive's log, per epoch
    assert not (work / "tmp/pretrain/resume.pt").exists()

    proc = run_stage(work, "embed")
    assert proc.returncode == 0, proc.stderr
    for name, split in splits.items():
        got = read_embeddings(work / "data/embeddings" / f"{name}.parquet")
        assert got.embeddings.shape == (len(split.ids), 64)
        assert sorted(got.class_names) == sorted(split.classes)

    (work / "data/pretrain/backbone.pt").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        embed_stage.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: data/pretrain/backbone.pt: no backbone checkpoint")
