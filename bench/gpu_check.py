"""The GPU check: how fast this machine runs each part of the project, as one JSON object.

    bench/gpu_check.sh                 # a CUDA machine: at most 8 minutes (--budget-s 420)
    bench/gpu_check.sh --short         # CPU, tiny sizes, seconds (tests/test_gpu_check.py)

Sections, in this order (each timed on its own; when the time budget runs out the rest are
listed under ``skipped`` with the reason, and a section that fails is listed under
``errors``, so one JSON object always comes out):

- ``leo``: LEO meta-training steps/s on SYNTHETIC 640-d embeddings of miniImageNet's split
  sizes, for the four published presets (mini/tiered, 1-/5-shot: batch 12, 5-way, 15
  queries), each ``eager``, ``compiled`` (``torch.compile``) and ``cudagraphs``
  (``torch.compile(mode="reduce-overhead")``, CUDA only). A step is everything
  :mod:`leo.meta.train` does per step (episodes, noise, forward, backward, update). Target on
  one H100/H200: 2,000 steps/s at mini-1shot (``target_met``).
- ``evaluate``: seconds of the paper's 10,000-episode 1-shot evaluation (599 queries per
  class on a 20 x 600 test split), compiled where CUDA is.
- ``pretrain``: WRN-28-10 training images/s at 80x80 (batch 128, SGD step of
  :func:`leo.backbone.epoch.train_step`, bfloat16 autocast, channels-last).
- ``embed``: frozen WRN-28-10 feature extraction images/s at 80x80
  (:func:`leo.backbone.embed.embed_images`, from uint8 images in host memory).
- ``dag``: the default pipeline with ``dvc repro``, one stage at a time up to ``report``,
  in a scratch copy of the project (``device: auto``: CUDA), with seconds per stage; needs
  ``LEO_DATA_DIR`` (the Omniglot archives). Short mode: the test suite's tiny project
  (tests/pipeline_helpers.py), its first stage (``--dag-target`` for more).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from leo.backbone.embed import embed_images  # noqa: E402
from leo.backbone.epoch import train_step  # noqa: E402
from leo.backbone.wrn import WideResNet, WRNConfig, to_input  # noqa: E402
from leo.core.config import make_config  # noqa: E402
from leo.core.model import init_params  # noqa: E402
from leo.core.noise import draw_noise  # noqa: E402
from leo.core.optim import Adam  # noqa: E402
from leo.core.step import MetaStep  # noqa: E402
from leo.data.synthetic import synthetic_split  # noqa: E402
from leo.meta.episodes import EpisodeSampler  # noqa: E402
from leo.meta.evaluate import evaluate  # noqa: E402

PRESETS = ("mini-1shot", "mini-5shot", "tiered-1shot", "tiered-5shot")
TARGET_STEPS_PER_S = 2000.0  # mini-1shot on one H100/H200
COPY = ("leo", "stages", "pipeline", "dvc.yaml", "params.yaml", ".gitignore", ".dvcignore",
        ".dvc/config", ".dvc/.gitignore")  # fmt: skip


class Budget:
    """Seconds left of the whole check."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def log(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- LEO
def leo_steps(preset: str, split, device: torch.device, mode: str, steps: int) -> dict:
    """Steps/s of one preset in one mode (eager, compiled, cudagraphs), and the first call."""
    cfg = make_config(preset, compile=False)
    params = {k: v.requires_grad_() for k, v in init_params(cfg, split.dim, None, device).items()}
    opt = Adam(params, cfg.outer_lr)
    step = MetaStep(cfg, device)
    if mode != "eager":
        kind = "reduce-overhead" if mode == "cudagraphs" else "default"
        step.grad_fn = torch.compile(step.grad_fn, dynamic=False, mode=kind)  # the one used
        step.loss_fn = torch.compile(step.loss_fn, dynamic=False, mode=kind)  # (autograd path)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, cfg.num_shots, 15)
    gen = torch.Generator(device=device).manual_seed(0)

    def one():
        if mode == "cudagraphs":
            torch.compiler.cudagraph_mark_step_begin()
        xs, xq, _ = sampler.sample(cfg.batch_size, gen)
        noise = draw_noise(cfg, cfg.batch_size, 15, split.dim, gen)
        return step(params, opt, xs, xq, noise)

    t0 = time.perf_counter()
    float(one()["loss"])
    first = time.perf_counter() - t0
    for _ in range(3):
        one()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = one()
    float(out["loss"])
    return {"steps_per_s": round(steps / (time.perf_counter() - t0), 1), "first_s": round(first, 2)}


def section_leo(device, short: bool, budget: Budget, result: dict) -> None:
    dim = 64 if short else 640
    split = synthetic_split(64, 60 if short else 600, dim, noise=0.05, seed=0).to(device)
    modes = ["eager"] if short else ["eager", "compiled"]
    if device.type == "cuda":
        modes.append("cudagraphs")
    steps = 5 if short else 300
    table: dict[str, dict] = {p: {} for p in PRESETS}
    result["leo"] = {"dim": dim, "steps_timed": steps, "steps_per_s": table}
    # every preset eager first, then each compiled mode preset by preset (mini-1shot first)
    order = [(p, "eager") for p in PRESETS] + [(p, m) for m in modes[1:] for p in PRESETS]
    for preset, mode in order:
        if budget.left() < (20 if mode == "eager" else 90):
            result["skipped"][f"leo.{preset}.{mode}"] = "time budget"
            continue
        try:
            log(f"leo {preset} {mode}")
            table[preset][mode] = leo_steps(preset, split, device, mode, steps)
        except Exception as err:  # record and go on: one JSON object always comes out
            result["errors"][f"leo.{preset}.{mode}"] = f"{type(err).__name__}: {err}"[:300]
    best = [v["steps_per_s"] for v in table["mini-1shot"].values()]
    result["leo"]["mini_1shot_best_steps_per_s"] = max(best) if best else None
    result["leo"]["target_steps_per_s"] = TARGET_STEPS_PER_S
    published = dim == 640 and device.type == "cuda"  # the target's setting
    result["leo"]["target_met"] = (max(best) >= TARGET_STEPS_PER_S) if best and published else None


def section_evaluate(device, short: bool, budget: Budget, result: dict) -> None:
    dim, per_class, episodes = (64, 60, 200) if short else (640, 600, 10_000)
    test = synthetic_split(20, per_class, dim, noise=0.05, seed=1, split="test").to(device)
    cfg = make_config("mini-1shot", compile=device.type == "cuda")
    params = init_params(cfg, dim, None, device)
    evaluate(params, cfg, test, num_episodes=200, device=device)  # warm-up (and compile)
    sync(device)
    res = evaluate(params, cfg, test, num_episodes=episodes, device=device)
    result["evaluate"] = {"episodes": episodes, "seconds": round(res.wall_seconds, 2)}


# ----------------------------------------------------------------------------- backbone
def wrn(short: bool, device: torch.device) -> tuple[WideResNet, int, int]:
    """WRN-28-10 at 80x80 (short: WRN-10-1 at 16x16), channels-last; (model, size, batch)."""
    depth, width, size, batch = (10, 1, 16, 8) if short else (28, 10, 80, 128)
    model = WideResNet(WRNConfig(depth, width, (2, 2, 2), 0.0, 3, 64))
    return model.to(device, memory_format=torch.channels_last), size, batch


def section_pretrain(device, short: bool, budget: Budget, result: dict) -> None:
    model, size, batch = wrn(short, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    amp = device.type == "cuda"
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (batch, size, size, 3), dtype=torch.uint8, generator=gen)
    x = to_input(x, device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 64, (batch,), generator=gen).to(device)
    model.train()
    for _ in range(3):
        train_step(model, opt, x, y, 0.1, amp)
    sync(device)
    steps = 3 if short else 30
    t0 = time.perf_counter()
    for _ in range(steps):
        train_step(model, opt, x, y, 0.1, amp)
    sync(device)
    seconds = time.perf_counter() - t0
    result["pretrain"] = {
        "model": f"WRN-{model.config.depth}-{model.config.width}",
        "image_size": size,
        "batch": batch,
        "bfloat16": amp,
        "channels_last": True,
        "images_per_s": round(steps * batch / seconds, 1),
    }


def section_embed(device, short: bool, budget: Budget, result: dict) -> None:
    model, size, _ = wrn(short, device)
    n, batch = (64, 16) if short else (8192, 512)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    embed_images(model, images[: 2 * batch], batch)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    embed_images(model, images, batch)
    sync(device)
    result["embed"] = {
        "model": f"WRN-{model.config.depth}-{model.config.width}",
        "image_size": size,
        "images": n,
        "images_per_s": round(n / (time.perf_counter() - t0), 1),
    }


# ----------------------------------------------------------------------------- the DAG
def scratch_project(root: Path, short: bool) -> tuple[Path, dict[str, str]]:
    """A git repository holding a copy of the project (short: the tests' tiny project)."""
    if short:
        sys.path.insert(0, str(ROOT / "tests"))
        from pipeline_helpers import make_project

        return make_project(root)
    project = root / "project"
    for name in COPY:
        src, dst = ROOT / name, project / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "tmp"))
        elif src.exists():
            shutil.copy2(src, dst)
    bindir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.update(GIT_AUTHOR_NAME="gpu-check", GIT_AUTHOR_EMAIL="gpu@check",
               GIT_COMMITTER_NAME="gpu-check", GIT_COMMITTER_EMAIL="gpu@check")  # fmt: skip
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "check"]):
        subprocess.run(cmd, cwd=project, env=env, check=True, capture_output=True)
    return project, env


def section_dag(device, short: bool, budget: Budget, result: dict, target: str) -> None:
    if not short and not os.environ.get("LEO_DATA_DIR"):
        result["skipped"]["dag"] = "LEO_DATA_DIR is not set (the Omniglot archives)"
        return
    from pipeline.flow import pipeline_stages

    dvc = str(Path(sys.executable).parent / "dvc")
    with tempfile.TemporaryDirectory(prefix="leo-gpu-check-") as tmp:
        project, env = scratch_project(Path(tmp), short)
        stages = pipeline_stages(project, [target], env=env)
        times: dict[str, float] = {}
        result["dag"] = {"target": target, "device": device.type, "stage_seconds": times}
        for stage in stages:
            left = budget.left()
            if left < 10:
                result["skipped"]["dag"] = f"time budget: from {stage} on"
                break
            log(f"dag: {stage}")
            t0 = time.perf_counter()
            try:
                done = subprocess.run(
                    [dvc, "repro", "--single-item", stage],
                    cwd=project,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=left - 5,
                )
            except subprocess.TimeoutExpired:
                result["skipped"]["dag"] = f"time budget: {stage} unfinished"
                break
            times[stage] = round(time.perf_counter() - t0, 1)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
                result["errors"]["dag"] = f"{stage}: {' '.join(tail)}"[:300]
                break
        result["dag"]["seconds"] = round(sum(times.values()), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", action="store_true", help="CPU, tiny sizes, seconds")
    ap.add_argument("--device", default=None, help="default: cuda if present (short: cpu)")
    ap.add_argument("--budget-s", type=float, default=None, help="default 420 (short: 120)")
    ap.add_argument("--dag-target", default=None, help="default report (short: check)")
    args = ap.parse_args()
    short = args.short
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not short
                                          else "cpu"))  # fmt: skip
    if device.type == "cpu":
        torch.set_num_threads(1)  # these small kernels run best on one thread
    warnings.filterwarnings("ignore", message=".*queries per class")  # short mode's small split
    budget = Budget(args.budget_s or (120.0 if short else 420.0))
    t0 = time.perf_counter()
    result: dict = {
        "what": "GPU check (bench/gpu_check.sh): speed of every part of the project",
        "mode": "short" if short else "full",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "skipped": {},
        "errors": {},
    }
    sections = [
        ("leo", section_leo),
        ("evaluate", section_evaluate),
        ("pretrain", section_pretrain),
        ("embed", section_embed),
    ]
    for name, fn in sections:
        if budget.left() < 15:
            result["skipped"][name] = "time budget"
            continue
        log(name)
        try:
            fn(device, short, budget, result)
        except Exception as err:  # one JSON object always comes out
            result["errors"][name] = f"{type(err).__name__}: {err}"[:300]
    target = args.dag_target or ("check" if short else "report")
    try:
        section_dag(device, short, budget, result, target)
    except Exception as err:
        result["errors"]["dag"] = f"{type(err).__name__}: {err}"[:300]
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
