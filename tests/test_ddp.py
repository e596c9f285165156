"""Data-parallel pre-training and embedding with real torch.distributed processes (gloo, CPU):
the stages launch torchrun themselves; 2 processes train the model 1 process trains (same
global batch, synchronised batch norm), resume after a kill, embed the same bytes; bad launch
settings fail in one line with nothing written."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from leo.backbone.distributed import (
    GlobalBatchNorm2d,
    batch_rows,
    check_processes,
    init_distributed,
)
from leo.backbone.embed import embed_splits
from leo.backbone.launch import Launch, first_error, node_command, split_endpoint
from leo.backbone.pretrain import BACKBONE_FILE, pretrain, split_heldout
from leo.backbone.wrn import WideResNet, WRNConfig, channel_stats, load_backbone, to_input
from leo.data.prepared import PreparedSplit, load_prepared_split, save_prepared
from leo.settings import load_settings
from leo.utils.errors import LeoInputError

REPO = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow  # real torchrun launches: 10-20 s each on 2 cores


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def split_of(name: str, classes: int, per_class: int, seed: int) -> PreparedSplit:
    """Grey 16x16 images: a class-specific bright square on noise (learnable in a few steps)."""
    rng = np.random.default_rng(seed)
    n = classes * per_class
    labels = np.arange(n) % classes
    images = rng.integers(0, 90, (n, 16, 16, 1), dtype=np.uint8)
    for i, c in enumerate(labels):
        r, q = divmod(int(c), 3)
        images[i, 2 + 5 * r : 6 + 5 * r, 2 + 5 * q : 6 + 5 * q] = 230
    names = [f"{name}{c}" for c in range(classes)]
    return PreparedSplit(images, labels, names, np.array([f"{name}/{i:03d}" for i in range(n)]))


def tiny_params(**pretrain) -> dict:
    """The repository's params.yaml with a tiny CPU pre-training and embedding."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["base"]["cpu_threads"] = 1
    params["pretrain"].update(
        **{"device": "cpu", "heldout_fraction": 0.2, "eval_batch_size": 8, **pretrain}
    )
    params["pretrain"]["omniglot"].update(depth=10, width=1, epochs=2, batch_size=16, lr=0.02)
    params["embed"].update(device="cpu", batch_size=7)
    return params


@pytest.fixture()
def work(tmp_path) -> Path:
    """A stage working directory: data/prepared with 5 train classes x 13 images (the last
    global batch of every epoch is partial and splits unevenly over 2 processes)."""
    splits = {
        "train": split_of("t", 5, 13, 0),
        "val": split_of("v", 3, 5, 1),
        "test": split_of("s", 3, 6, 2),
    }
    save_prepared(tmp_path / "data" / "prepared", splits, {"dataset": "omniglot", "channels": 1})
    return tmp_path


def write_params(work: Path, params: dict) -> None:
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(
    work: Path, name: str, *args: str, timeout: float = 180
) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ units
def test_batch_rows_partition_every_global_batch_in_one_process_order():
    for n in (16, 3, 1):
        for world in (1, 2, 3, 4):
            parts = [batch_rows(n, r, world) for r in range(world)]
            assert sorted(np.concatenate(parts).tolist()) == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_processes_beyond_the_cuda_devices_are_refused_in_one_line():
    with pytest.raises(LeoInputError, match=r"^p\.yaml: k: 3 processes .* but 2 CUDA devices"):
        check_processes(torch.device("cuda"), 3, "p.yaml: k", 2)
    check_processes(torch.device("cuda"), 2, "p.yaml: k", 2)
    check_processes(torch.device("cpu"), 64, "p.yaml: k", 0)  # gloo: any number on the CPU


def test_a_worker_outside_torchrun_or_in_another_world_is_refused(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(LeoInputError, match="^not launched by torchrun"):
        init_distributed("cpu", "p.yaml: pretrain.device", 2)
    for name, value in {"RANK": 0, "WORLD_SIZE": 3, "LOCAL_RANK": 0, "LOCAL_WORLD_SIZE": 3}.items():
        monkeypatch.setenv(name, str(value))
    with pytest.raises(
        LeoInputError, match=r"^p\.yaml: k: 2 processes asked for, torchrun started 3$"
    ):
        init_distributed("cpu", "p.yaml: pretrain.device", 2, world_key="p.yaml: k")


def test_torchrun_command_and_the_line_that_explains_a_failure():
    one = node_command(Launch("stages.pretrain", 2), 0, python="py")
    assert one[:3] == ["py", "-m", "torch.distributed.run"] and "--standalone" in one
    assert one[-3:] == ["-m", "stages.pretrain", "--worker"]
    many = node_command(Launch("stages.embed", 4, 2, "[::1]:29400", 12.4), 1, python="py")
    joined = " ".join(many)
    assert "--nnodes 2 --node-rank 1 --master-addr ::1 --master-port 29400" in joined
    assert "--rdzv-conf timeout=12" in joined and "--standalone" not in many
    assert split_endpoint("gpu-0.lan:29500", "k") == ("gpu-0.lan", 29500)
    with pytest.raises(LeoInputError, match="^k: must be host:port"):
        split_endpoint("gpu-0.lan:70000", "k")
    out = [
        "Traceback (most recent call last):",
        "torch.distributed.DistStoreError: Timed out after 4 seconds waiting for clients.",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: ",
    ]
    assert first_error(out) == (
        "DistStoreError: Timed out after 4 seconds waiting for clients.",
        False,
    )
    out = ["epoch 1", "error: data/x: bad", "error: data/x: bad", "ValueError: later"]
    assert first_error(out) == ("data/x: bad", True)
    out = ["[rank1]: Traceback (most recent call last):", "[rank1]: ValueError: bad npz"]
    assert first_error(out) == ("ValueError: bad npz", False)
    assert first_error(["all fine"]) == (None, False)


def test_global_batchnorm_is_batchnorm_in_one_process_and_eval_mode():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    plain, ours = torch.nn.BatchNorm2d(3), GlobalBatchNorm2d(3)
    torch.testing.assert_close(ours(x), plain(x), rtol=0, atol=0)  # no process group: the same
    torch.testing.assert_close(ours.running_var, plain.running_var, rtol=0, atol=0)


# ------------------------------------------------------------------------------ pretrain
def load_model(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def run_until_resume_file(work: Path, resume: Path) -> int:
    """Start the stage, SIGKILL its process group (the stage and torchrun; the workers, in their
    own sessions, follow through PR_SET_PDEATHSIG) once rank 0 wrote a resume file; returns
    the epoch it holds."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain"],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    ) as proc:
        deadline = time.monotonic() + 120
        while not resume.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, 9)
    assert resume.exists(), "the run ended before the first resume file appeared"
    return torch.load(resume, weights_only=True)["epoch"]


@slow
def test_ddp_pretrain_two_gloo_processes_killed_resumed_equal_one_process(work):
    """The stage with 2 processes (torchrun, gloo, synchronised batch norm), killed after an
    epoch and rerun, against 1 process with the same global batch, uninterrupted: parameters
    equal within float rounding, the held-out accuracy gathered across ranks equal."""
    epochs = 4
    params = tiny_params(processes_per_node=2)
    params["pretrain"]["omniglot"]["epochs"] = epochs
    write_params(work, params)
    resume = work / "tmp/pretrain/resume.pt"
    killed_at = run_until_resume_file(work, resume)
    assert 1 <= killed_at < epochs
    time.sleep(2)  # no orphaned worker goes on writing
    assert torch.load(resume, weights_only=True)["epoch"] == killed_at
    assert not (work / "data/pretrain" / BACKBONE_FILE).exists()

    proc = run_stage(work, "pretrain")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "2 processes" in proc.stdout and "on 2 processes" in proc.stdout
    ran = [line for line in proc.stdout.splitlines() if line.startswith("pretrain epoch ")]
    assert ran[0].startswith(f"pretrain epoch {killed_at + 1}/{epochs}")  # resumed, not redone
    assert len(ran) == epochs - killed_at
    logged = (work / "reports/pretrain/plots/metrics/heldout_acc.tsv").read_text().splitlines()
    assert len(logged) == 1 + epochs  # the saved epochs logged again, then the new ones
    # rank 0 alone wrote: one checkpoint, no temporary file, the resume file removed
    assert sorted(p.name for p in (work / "data/pretrain").iterdir()) == [BACKBONE_FILE]
    assert not resume.exists()

    cfg = load_settings(work / "params.yaml").pretrain_config()
    one = pretrain(work / "data/prepared", work / "one", cfg)
    ddp_ckpt = torch.load(work / "data/pretrain" / BACKBONE_FILE, weights_only=True)
    ddp, ref = ddp_ckpt["model"], load_model(work / "one" / BACKBONE_FILE)
    assert ddp.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(ddp[k], ref[k], rtol=1e-4, atol=5e-5, msg=k)
    # ... after training that moved them far beyond that tolerance
    split = load_prepared_split(work / "data/prepared", "train")
    train, held = split_heldout(split.labels, cfg.heldout_fraction, cfg.seed)
    torch.manual_seed(cfg.seed)
    init = WideResNet(WRNConfig(10, 1, cfg.strides, 0.0, 1, 5), *channel_stats(split.images, train))
    init = init.state_dict()
    assert max(float((ref[k] - init[k]).abs().max()) for k in init if "weight" in k) > 0.05

    metrics = json.loads((work / "reports/pretrain/metrics.json").read_text())
    assert metrics["processes"] == 2 and one["processes"] == 1
    assert ddp_ckpt["metrics"]["best_epoch"] == one["best_epoch"]
    # the held-out accuracy gathered across the 2 ranks is the single-process one ...
    assert metrics["backbone_heldout_accuracy"] == one["backbone_heldout_accuracy"]
    assert metrics["backbone_train_accuracy"] == one["backbone_train_accuracy"]
    # ... and that of the saved model, scored here in one process
    model, _ = load_backbone(work / "data/pretrain" / BACKBONE_FILE)
    with torch.inference_mode():
        pred = model(to_input(split.images[held])).argmax(1).numpy()
    assert metrics["backbone_heldout_accuracy"] == float(np.mean(pred == split.labels[held]))
    assert metrics["train_loss"] == pytest.approx(one["history"][-1]["train_loss"], rel=1e-4)


# ------------------------------------------------------------------------------ embed
@slow
def test_distributed_embed_two_processes_write_the_bytes_of_one_process(work):
    """``embed.processes: 2``: the ranks split the batches, rank 0 writes; the Parquet files
    are byte-identical to one process's (batch size 7: uneven rounds, a partial last batch)."""
    write_params(work, tiny_params())
    cfg = load_settings(work / "params.yaml").pretrain_config()
    pretrain(work / "data/prepared", work / "data/pretrain", cfg)
    one = embed_splits(
        work / "data/prepared", work / "data/pretrain" / BACKBONE_FILE, work / "one", batch_size=7
    )
    params = tiny_params()
    params["embed"]["processes"] = 2
    write_params(work, params)
    proc = run_stage(work, "embed")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    assert "2 processes" in proc.stdout
    names = sorted(p.name for p in (work / "data/embeddings").iterdir())
    assert names == ["test.parquet", "train.parquet", "val.parquet"]  # nothing else, no temp
    for name in names:
        assert (work / "data/embeddings" / name).read_bytes() == (work / "one" / name).read_bytes()
    assert one["splits"] == {"train": 65, "val": 15, "test": 18}


# ------------------------------------------------------------------------------ bad input
def in_process_stage(work: Path, monkeypatch, capsys, module) -> tuple[int, str]:
    """Run a stage's main() here (no second interpreter); returns (exit code, stderr)."""
    from stages import common

    monkeypatch.chdir(work)
    common.settings.cache_clear()
    capsys.readouterr()
    try:
        with pytest.raises(SystemExit) as exit_info:
            module.main()
    finally:
        common.settings.cache_clear()
    return exit_info.value.code, capsys.readouterr().err


def test_distributed_launch_settings_are_refused_in_one_line_before_anything_runs(
    work, monkeypatch, capsys
):
    from stages import embed as embed_stage
    from stages import pretrain as pretrain_stage

    write_params(work, tiny_params(processes_per_node=3))  # a global batch of 16 on 3
    code, err = in_process_stage(work, monkeypatch, capsys, pretrain_stage)
    assert code == 2 and err.count("\n") == 1
    assert err == (
        "error: params.yaml: pretrain.omniglot.batch_size: 16 is not divisible by the 3 "
        "processes (processes_per_node x nodes)\n"
    )
    if not torch.cuda.is_available():  # CUDA asked for where there is none
        write_params(work, tiny_params(processes_per_node=2, device="cuda"))
        code, err = in_process_stage(work, monkeypatch, capsys, pretrain_stage)
        assert code == 2 and err.startswith("error: params.yaml: pretrain.device is 'cuda' but")
    params = tiny_params()
    params["embed"].update(processes=2, device="cuda:0")
    write_params(work, params)
    code, err = in_process_stage(work, monkeypatch, capsys, embed_stage)
    assert code == 2 and err.count("\n") == 1 and "embed.device" in err
    assert not (work / "data/pretrain").exists() and not (work / "data/embeddings").exists()


@slow
def test_distributed_worker_errors_and_a_dead_rendezvous_fail_in_one_line(work):
    """A worker's bad input comes back as its one line (exit 2); a rendezvous that never
    completes (the other machine never joins) fails after rdzv_timeout_s, in one line."""
    port = free_port()
    write_params(
        work,
        tiny_params(nodes=2, rdzv_endpoint=f"127.0.0.1:{port}", rdzv_timeout_s=3),
    )
    t0 = time.monotonic()
    proc = run_stage(work, "pretrain", timeout=120)
    took = time.monotonic() - t0
    assert proc.returncode != 0 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(
        f"error: params.yaml: pretrain.rdzv_endpoint: no rendezvous of 2 machines at "
        f"127.0.0.1:{port} within 3 s ("
    )
    assert took < 60, took  # bounded by the timeout, not torchrun's default 600 s
    for out in ("data/pretrain", "reports", "tmp"):
        assert not (work / out).exists(), out
    # what the other machine runs to join, printed from the same params
    proc = run_stage(work, "pretrain", "--node-command", "1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == (
        f"torchrun --nproc-per-node 1 --nnodes 2 --node-rank 1 --master-addr 127.0.0.1 "
        f"--master-port {port} --rdzv-conf timeout=3 --max-restarts 0 -m stages.pretrain "
        "--worker\n"
    )

    resume = work / "tmp/pretrain/resume.pt"  # read by rank 0 alone, which refuses it
    resume.parent.mkdir(parents=True)
    resume.write_bytes(b"not a checkpoint")
    write_params(work, tiny_params(processes_per_node=2))
    proc = run_stage(work, "pretrain")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("error: tmp/pretrain/resume.pt: unreadable resume checkpoint")
    resume.unlink()
