"""Meta-training: learns an easy problem fast, resumes exactly, checkpoints are safe."""

import time

import pytest
import torch

from leo.config import make_config
from leo.errors import LeoInputError
from leo.evaluate import evaluate
from leo.synthetic import synthetic_split
from leo.train import load_checkpoint, meta_train


def _splits(dim=32, noise=0.1):
    kw = dict(per_class=20, dim=dim, noise=noise)
    return (
        synthetic_split(30, split="train", seed=0, **kw),
        synthetic_split(10, split="val", seed=1, **kw),
        synthetic_split(10, split="test", seed=2, **kw),
    )


def _cfg(**kw):
    base = dict(
        latent_dim=16,
        num_steps=40,
        validate_every=10,
        val_batches=1,
        val_batch_size=20,
        compile=False,
        outer_lr=1e-3,
        eval_per_class_total=None,
    )
    return make_config("default", **{**base, **kw})


def test_easy_synthetic_problem_reaches_90_percent_within_seconds(tmp_path):
    train, val, test = _splits(noise=0.08)
    cfg = _cfg(num_steps=150, validate_every=50)
    start = time.perf_counter()
    result = meta_train(cfg, train, val, tmp_path, progress=False)
    params, loaded_cfg, _ = load_checkpoint(result.checkpoint)
    acc = evaluate(params, loaded_cfg, test, num_episodes=500, batch_size=250).mean
    assert acc >= 0.90, acc
    assert time.perf_counter() - start < 60


def test_resume_after_a_kill_continues_the_same_run(tmp_path):
    train, val, _ = _splits()
    cfg = _cfg()
    straight = meta_train(cfg, train, val, tmp_path / "a", progress=False)
    killed = meta_train(cfg, train, val, tmp_path / "b", progress=False, stop_after=25)
    assert killed.steps == 25
    resumed = meta_train(cfg, train, val, tmp_path / "b", progress=False)
    assert resumed.steps == straight.steps == 40

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "elapsed_seconds"} for r in rows]

    assert strip(resumed.history) == strip(straight.history)
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)["params"]
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "b" / "history.csv").read_text().count("\n") == 1 + 4


def test_resume_with_another_config_is_refused(tmp_path):
    train, val, _ = _splits()
    meta_train(_cfg(num_steps=10), train, val, tmp_path, progress=False)
    with pytest.raises(LeoInputError, match="state.pt: saved by a different config"):
        meta_train(_cfg(num_steps=10, outer_lr=5e-4), train, val, tmp_path, progress=False)


def test_best_checkpoint_holds_the_best_validation(tmp_path):
    train, val, _ = _splits()
    result = meta_train(_cfg(), train, val, tmp_path, progress=False)
    _, _, meta = load_checkpoint(result.checkpoint)
    best_row = max(result.history, key=lambda r: r["val_accuracy"])
    assert meta["step"] == best_row["step"] == result.best_step
    assert meta["val_accuracy"] == pytest.approx(best_row["val_accuracy"])


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LeoInputError, match="best.pt: not a LEO checkpoint"):
        load_checkpoint(bad)
    with pytest.raises(LeoInputError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_prefetching_on_a_thread_trains_exactly_like_drawing_in_line(tmp_path):
    train, val, _ = _splits()
    cfg = _cfg(num_steps=30)
    ahead = meta_train(cfg, train, val, tmp_path / "a", progress=False, prefetch=True)
    inline = meta_train(cfg, train, val, tmp_path / "b", progress=False, prefetch=False)
    pa, _, _ = load_checkpoint(ahead.checkpoint)
    pb, _, _ = load_checkpoint(inline.checkpoint)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    sa = torch.load(tmp_path / "a" / "state.pt", weights_only=True)
    sb = torch.load(tmp_path / "b" / "state.pt", weights_only=True)
    # the saved generator states are those after the last step's batch, not a batch ahead
    assert torch.equal(sa["episode_gen"], sb["episode_gen"])
    assert torch.equal(sa["noise_gen"], sb["noise_gen"])
    assert [r["val_accuracy"] for r in ahead.history] == [r["val_accuracy"] for r in inline.history]
