"""Supervised pre-training on tiny real Omniglot: it learns, reads only train, resumes exactly
(its DVCLive log included), writes byte-identical checkpoints for equal runs."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from shared_data import OMNIGLOT as REAL

from leo.backbone.pretrain import BACKBONE_FILE, PretrainConfig, lr_at, pretrain, split_heldout
from leo.data.prepared import PreparedSplit, save_prepared
from leo.utils.errors import LeoInputError
from leo.utils.live import METRICS_DIR, open_live, read_logged
from stages import common
from stages import pretrain as pretrain_stage

REPO = Path(__file__).resolve().parents[1]
OMNIGLOT = REAL / "images_background_small1.zip"
needs_omniglot = pytest.mark.skipif(not OMNIGLOT.is_file(), reason="real Omniglot not available")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run best on one thread; two spin-wait badly on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def omniglot_characters(num_classes: int, size: int = 28) -> PreparedSplit:
    """The first ``num_classes`` characters of the real Omniglot archive, 20 drawings each."""
    with zipfile.ZipFile(OMNIGLOT) as zf:
        names = sorted(n for n in zf.namelist() if n.endswith(".png"))
        chars = sorted({n.rsplit("/", 1)[0] for n in names})[:num_classes]
        images, labels, ids = [], [], []
        for label, char in enumerate(chars):
            for name in (n for n in names if n.startswith(char + "/")):
                png = Image.open(io.BytesIO(zf.read(name))).convert("L")
                images.append(np.asarray(png.resize((size, size), Image.BILINEAR))[..., None])
                labels.append(label)
                ids.append(name.split("/", 1)[1])
    classes = [c.split("/", 1)[1] for c in chars]
    return PreparedSplit(np.stack(images), np.array(labels), classes, np.array(ids))


def poison(path: Path) -> None:
    path.write_bytes(b"not an npz: pretraining must never read the val/test splits")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Prepared dir: train = 5 real Omniglot characters; val/test written, then poisoned."""
    root = tmp_path_factory.mktemp("prepared")
    train = omniglot_characters(5)
    rng = np.random.default_rng(0)
    other = PreparedSplit(
        rng.integers(0, 256, (6, 28, 28, 1), dtype=np.uint8),
        np.arange(6) % 2,
        ["x", "y"],
        np.array([f"o{i}" for i in range(6)]),
    )
    save_prepared(root, {"train": train, "val": other, "test": other}, {"dataset": "omniglot"})
    poison(root / "val.npz")
    poison(root / "test.npz")
    return root


def tiny(**kw) -> PretrainConfig:
    base = dict(depth=10, width=1, epochs=2, batch_size=32, lr=0.1, heldout_fraction=0.2)
    return PretrainConfig(**{**base, **kw})


def test_split_heldout_is_per_class_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [20, 20, 10, 3, 1])
    tr, held = split_heldout(labels, 0.2, seed=3)
    assert np.array_equal(np.sort(np.concatenate([tr, held])), np.arange(len(labels)))
    assert np.bincount(labels[held], minlength=5).tolist() == [4, 4, 2, 1, 0]
    assert np.array_equal(held, split_heldout(labels, 0.2, seed=3)[1])
    assert not np.array_equal(held, split_heldout(labels, 0.2, seed=4)[1])


def test_lr_schedules():
    cos = PretrainConfig(epochs=10, lr=0.2, schedule="cosine")
    assert lr_at(cos, 0) == pytest.approx(0.2) and lr_at(cos, 5) == pytest.approx(0.1)
    assert lr_at(cos, 10) == pytest.approx(0.0, abs=1e-12)
    step = PretrainConfig(epochs=10, lr=0.2, schedule="step", milestones=[3, 6], gamma=0.5)
    assert [lr_at(step, e) for e in (0, 2.9, 3, 6.5)] == pytest.approx([0.2, 0.2, 0.1, 0.05])


@needs_omniglot
def test_tiny_real_omniglot_pretrain_learns_and_reads_only_train(prepared, tmp_path, monkeypatch):
    opened = []
    real_load = np.load
    monkeypatch.setattr(
        np, "load", lambda f, *a, **k: opened.append(str(f)) or real_load(f, *a, **k)
    )
    cfg = tiny(width=2, epochs=15, batch_size=16, lr=0.05, augment="shift", pad=1)
    metrics = pretrain(prepared, tmp_path / "out", cfg)
    assert [Path(p).name for p in opened] == ["train.npz"]
    # 5 classes (chance 0.2); 4 held-out drawings per class never trained on. Seeds 0-5
    # reach 0.7-0.95 held-out and 0.95-1.0 train accuracy (one thread, about 1.5 s CPU).
    assert metrics["num_classes"] == 5 and metrics["num_heldout_images"] == 20
    assert metrics["backbone_heldout_accuracy"] >= 0.5, metrics
    assert metrics["backbone_train_accuracy"] >= 0.8, metrics
    assert metrics["feature_dim"] == 128 and len(metrics["history"]) == 15
    best = max(r["heldout_acc"] for r in metrics["history"])
    assert metrics["backbone_heldout_accuracy"] == best
    ckpt = torch.load(tmp_path / "out" / BACKBONE_FILE, weights_only=True)
    assert ckpt["metrics"]["best_epoch"] == metrics["best_epoch"]
    assert ckpt["dataset"] == "omniglot" and len(ckpt["classes"]) == 5


def _tsv_files(live_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((live_dir / METRICS_DIR).glob("*.tsv"))}


@needs_omniglot
def test_resume_after_kill_equals_uninterrupted_run(prepared, tmp_path):
    cfg = tiny(epochs=3, dropout=0.2, seed=5)
    with open_live(tmp_path / "log_a") as live:
        straight = pretrain(
            prepared, tmp_path / "a", cfg, resume_path=tmp_path / "a.resume", live=live
        )
    assert not (tmp_path / "a.resume").exists()  # removed after success

    # A stale resume file (another config) must be ignored, not continued.
    pretrain(
        prepared,
        tmp_path / "b",
        tiny(epochs=3, seed=6),
        resume_path=tmp_path / "b.resume",
        stop_after=1,
    )
    with open_live(tmp_path / "log_b") as live:
        killed = pretrain(
            prepared,
            tmp_path / "b",
            cfg,
            resume_path=tmp_path / "b.resume",
            stop_after=2,
            live=live,
        )
    assert killed["stopped_after"] == 2 and not (tmp_path / "b" / BACKBONE_FILE).exists()
    with open_live(tmp_path / "log_b") as live:  # a fresh log, as after DVC removed the outs
        resumed = pretrain(
            prepared, tmp_path / "b", cfg, resume_path=tmp_path / "b.resume", live=live
        )

    assert resumed["history"] == straight["history"]
    # the resumed run's log equals the uninterrupted run's, byte for byte, one row per epoch
    names = ["train_loss", "train_acc", "heldout_acc", "lr"]
    assert sorted(_tsv_files(tmp_path / "log_a")) == sorted(f"{n}.tsv" for n in names)
    assert _tsv_files(tmp_path / "log_a") == _tsv_files(tmp_path / "log_b")
    logged = read_logged(tmp_path / "log_b", names)
    assert [{**r, "step": int(r["step"])} for r in logged] == [
        {"step": r["epoch"], **{n: r[n] for n in names}} for r in straight["history"]
    ]
    # equal runs, equal bytes: no timing and no temporary file name inside the checkpoint
    assert (tmp_path / "a" / BACKBONE_FILE).read_bytes() == (
        tmp_path / "b" / BACKBONE_FILE
    ).read_bytes()
    ckpt = torch.load(tmp_path / "a" / BACKBONE_FILE, weights_only=True)
    assert "wall_seconds" not in ckpt["metrics"] and "wall_seconds" in straight
    assert resumed["backbone_heldout_accuracy"] == straight["backbone_heldout_accuracy"]
    a = torch.load(tmp_path / "a" / BACKBONE_FILE, weights_only=True)["model"]
    b = torch.load(tmp_path / "b" / BACKBONE_FILE, weights_only=True)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Exploit:
    def __reduce__(self):
        return (os.mkdir, (os.environ["LEO_TEST_MARKER"],))


@needs_omniglot
def test_poisoned_resume_file_is_refused_not_executed(prepared, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("LEO_TEST_MARKER", str(marker))
    (tmp_path / "r.pt").write_bytes(pickle.dumps({"epoch": _Exploit()}, protocol=2))
    with pytest.raises(LeoInputError, match="r.pt"):
        pretrain(prepared, tmp_path / "out", tiny(epochs=1), resume_path=tmp_path / "r.pt")
    assert not marker.exists()


def stage_params() -> dict:
    """The repository's params.yaml (every stage validates all of it) with a tiny pretrain."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["pretrain"].update(device="cpu", heldout_fraction=0.2, eval_batch_size=64)
    params["pretrain"]["omniglot"].update(depth=10, width=1, epochs=1, batch_size=32)
    return params


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


def test_stage_fails_in_one_line_on_missing_prepared_dir_and_bad_key(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(stage_params()))
    proc = run_stage(tmp_path, "pretrain")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: data/prepared/manifest.json: no prepared dataset")

    bad = stage_params()
    bad["pretrain"]["omniglot"]["lr"] = "fast"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(bad))
    monkeypatch.chdir(tmp_path)  # the same stage in-process (a second interpreter is slow)
    common.settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_info:
            pretrain_stage.main()
    finally:
        common.settings.cache_clear()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().count("\n") == 0
    assert err.startswith("error: params.yaml") and "pretrain.omniglot.lr" in err
