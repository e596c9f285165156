"""Meta-training: learns an easy problem fast, resumes exactly (logs included), refuses a state
made on other data, writes deterministic checkpoints, runs on the threads it is given."""

import math
import time

import pytest
import torch

from leo.core.config import make_config
from leo.data.synthetic import synthetic_split
from leo.meta.evaluate import evaluate
from leo.meta.loop import data_sha256
from leo.meta.train import HISTORY_FIELDS, LEO_COLUMNS, load_checkpoint, meta_train
from leo.utils.errors import LeoInputError
from leo.utils.live import METRICS_DIR, open_live, read_logged


def _splits(dim=32, noise=0.1, seed=0):
    kw = dict(per_class=20, dim=dim, noise=noise)
    return (
        synthetic_split(30, split="train", seed=seed, **kw),
        synthetic_split(10, split="val", seed=seed + 1, **kw),
        synthetic_split(10, split="test", seed=seed + 2, **kw),
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


def _logged_files(live_dir):
    """{relative path: bytes} of a DVCLive log's plot files."""
    root = live_dir / METRICS_DIR
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.tsv"))}


def test_easy_synthetic_problem_reaches_90_percent_within_seconds(tmp_path):
    train, val, test = _splits(noise=0.08)
    cfg = _cfg(num_steps=150, validate_every=50)
    start = time.perf_counter()
    result = meta_train(cfg, train, val, tmp_path, progress=False)
    params, loaded_cfg, _ = load_checkpoint(result.checkpoint)
    acc = evaluate(params, loaded_cfg, test, num_episodes=500, batch_size=250).mean
    assert acc >= 0.90, acc
    assert time.perf_counter() - start < 60


def test_resume_after_a_kill_continues_the_same_run_and_its_log(tmp_path):
    train, val, _ = _splits()
    cfg = _cfg()
    with open_live(tmp_path / "log_a") as live:
        straight = meta_train(cfg, train, val, tmp_path / "a", progress=False, live=live)
    with open_live(tmp_path / "log_b") as live:
        killed = meta_train(
            cfg, train, val, tmp_path / "b", progress=False, stop_after=25, live=live
        )
    assert killed.steps == 25 and [r["step"] for r in killed.history] == [10, 20]
    with open_live(tmp_path / "log_b") as live:  # a fresh log, as after DVC removed the outs
        resumed = meta_train(cfg, train, val, tmp_path / "b", progress=False, live=live)
    assert resumed.steps == straight.steps == 40
    assert resumed.history == straight.history  # no timings in the rows: exactly equal
    assert list(straight.history[0]) == HISTORY_FIELDS + LEO_COLUMNS
    a = torch.load(tmp_path / "a" / "state.pt", weights_only=True)["params"]
    b = torch.load(tmp_path / "b" / "state.pt", weights_only=True)["params"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a/best.pt").read_bytes() == (tmp_path / "b/best.pt").read_bytes()

    # the log of the resumed run equals the uninterrupted run's, byte for byte
    files = _logged_files(tmp_path / "log_a")
    assert sorted(files) == sorted(f"{c}.tsv" for c in HISTORY_FIELDS[1:] + LEO_COLUMNS)
    assert files == _logged_files(tmp_path / "log_b")
    rows = read_logged(tmp_path / "log_b", HISTORY_FIELDS[1:] + LEO_COLUMNS)
    assert [{**r, "step": int(r["step"])} for r in rows] == straight.history


def test_resume_with_another_config_is_refused(tmp_path):
    train, val, _ = _splits()
    meta_train(_cfg(num_steps=10), train, val, tmp_path, progress=False)
    with pytest.raises(LeoInputError, match="state.pt: saved by a different config"):
        meta_train(_cfg(num_steps=10, outer_lr=5e-4), train, val, tmp_path, progress=False)


def test_a_state_made_on_other_data_is_refused_for_resume_and_for_a_finished_run(tmp_path):
    train, val, _ = _splits()
    other_train, other_val, _ = _splits(seed=10)  # same shapes and config, other embeddings
    assert data_sha256(train, val) != data_sha256(other_train, val)
    assert data_sha256(train, val) != data_sha256(train, other_val)
    cfg = _cfg(num_steps=20)
    meta_train(cfg, train, val, tmp_path / "killed", progress=False, stop_after=10)
    finished = meta_train(cfg, train, val, tmp_path / "done", progress=False)
    for out in ("killed", "done"):
        for splits in ((other_train, val), (train, other_val)):
            with pytest.raises(LeoInputError, match=rf"{out}/state.pt: saved by a run on other"):
                meta_train(cfg, *splits, tmp_path / out, progress=False)
    # the same data still resumes, or returns the finished result at once
    again = meta_train(cfg, train, val, tmp_path / "done", progress=False)
    assert again.history == finished.history and again.best_step == finished.best_step
    _, _, meta = load_checkpoint(finished.checkpoint)
    assert meta["data_sha256"] == data_sha256(train, val) and meta["method"] == "leo"
    assert "wall_seconds" not in meta and "elapsed" not in meta


def test_two_runs_on_the_same_inputs_write_byte_identical_best_checkpoints(tmp_path):
    train, val, _ = _splits()
    cfg = _cfg(num_steps=20)
    meta_train(cfg, train, val, tmp_path / "a", progress=False)
    meta_train(cfg, train, val, tmp_path / "b", progress=False)
    assert (tmp_path / "a/best.pt").read_bytes() == (tmp_path / "b/best.pt").read_bytes()


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


def test_an_unreadable_state_is_refused_in_one_line(tmp_path):
    train, val, _ = _splits()
    (tmp_path / "state.pt").write_bytes(b"half a file")
    with pytest.raises(LeoInputError, match=r"state.pt: unreadable training state") as err:
        meta_train(_cfg(num_steps=10), train, val, tmp_path, progress=False)
    assert "\n" not in str(err.value)


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
    assert all(torch.equal(x, y) for x, y in zip(sa["generators"], sb["generators"], strict=True))
    assert [r["val_accuracy"] for r in ahead.history] == [r["val_accuracy"] for r in inline.history]


class _ThreadSpy:
    """A stand-in for a DVCLive log that records torch's thread setting at every row."""

    def __init__(self) -> None:
        self.summary: dict = {}
        self.step = 0
        self.threads: list[int] = []

    def log_metric(self, name, value) -> None:
        pass

    def next_step(self) -> None:
        self.threads.append(torch.get_num_threads())


def test_training_runs_on_the_cpu_threads_it_is_given_and_restores_the_setting(tmp_path):
    train, val, _ = _splits()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        spy = _ThreadSpy()
        meta_train(_cfg(num_steps=20), train, val, tmp_path / "a", progress=False, live=spy)
        assert spy.threads == [1, 1]  # DEFAULT_CPU_THREADS, as the stages run
        assert torch.get_num_threads() == 2
        spy = _ThreadSpy()
        meta_train(
            _cfg(num_steps=20),
            train,
            val,
            tmp_path / "b",
            progress=False,
            live=spy,
            cpu_threads=None,
        )
        assert spy.threads == [2, 2]  # None: torch's own setting
    finally:
        torch.set_num_threads(before)


def test_train_loss_averages_the_finite_steps_and_counts_the_others(tmp_path, monkeypatch):
    """Steps 3 and 4 report NaN and inf losses: the interval's loss is the mean of its other
    8 steps (recomputed here from the losses themselves), and the row says 2 non-finite."""
    from leo.meta import train as train_module

    seen: list[float] = []
    real = train_module.MetaStep

    class Flaky(real):
        def __call__(self, *args, **kwargs):
            metrics = dict(super().__call__(*args, **kwargs))
            bad = {3: math.nan, 4: math.inf}.get(len(seen) + 1)
            if bad is not None:
                metrics["loss"] = torch.as_tensor(bad, dtype=metrics["loss"].dtype)
            seen.append(float(metrics["loss"]))
            return metrics

    monkeypatch.setattr(train_module, "MetaStep", Flaky)
    train, val, _ = _splits()
    result = meta_train(_cfg(num_steps=20), train, val, tmp_path, progress=False)
    first, second = result.history
    finite = [v for v in seen[:10] if math.isfinite(v)]
    assert len(finite) == 8 and first["nonfinite_steps"] == 2
    assert first["train_loss"] == pytest.approx(sum(finite) / 8, rel=1e-12)
    assert second["nonfinite_steps"] == 0
    assert second["train_loss"] == pytest.approx(sum(seen[10:20]) / 10, rel=1e-12)
