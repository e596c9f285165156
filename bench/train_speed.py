"""Meta-training and evaluation speed on SYNTHETIC embeddings of the published shape.

Prints one JSON object: steps/s of this package's step (compiled unless --eager; explicit
gradients unless --gradients autograd) and of a straightforward batched eager second-order
step (bench/straightforward.py) for the
mini-1shot and mini-5shot presets (batch 12, 5-way, 15 queries, 640-d), the ratio, the
first-call compile time, and seconds for a 10,000-episode 1-shot evaluation with 599
queries per class (20 classes x 600 rows, the miniImageNet test split's shape).

    python bench/train_speed.py [--device cuda] [--steps 100] [--threads 1] [--eager]
        [--gradients explicit|autograd] [--no-prefetch] [--dim 640]

Step timings include everything the training loop does per step: episode sampling, noise
drawing, forward, backward and update.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from straightforward import StraightforwardStep  # noqa: E402

from leo.core.config import make_config  # noqa: E402
from leo.core.model import init_params  # noqa: E402
from leo.core.noise import draw_noise  # noqa: E402
from leo.core.optim import Adam  # noqa: E402
from leo.core.step import MetaStep  # noqa: E402
from leo.data.synthetic import synthetic_split  # noqa: E402
from leo.meta.episodes import EpisodeSampler  # noqa: E402
from leo.meta.evaluate import evaluate  # noqa: E402
from leo.meta.prefetch import Prefetcher  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_leo(preset, split, device, steps, compile_, prefetch, gradients):
    cfg = make_config(preset, compile=compile_, gradients=gradients)
    params = {k: v.requires_grad_() for k, v in init_params(cfg, split.dim, None, device).items()}
    opt = Adam(params, cfg.outer_lr)
    step = MetaStep(cfg)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, cfg.num_shots, 15)
    gen = torch.Generator(device=device).manual_seed(0)

    def draw():
        xs, xq, _ = sampler.sample(cfg.batch_size, gen)
        return xs, xq, draw_noise(cfg, cfg.batch_size, 15, split.dim, gen)

    with Prefetcher(draw, (gen,), enabled=prefetch) as batches:  # as leo.meta.train does

        def one():
            return step(params, opt, *next(batches).batch)

        t0 = time.perf_counter()
        one()
        _sync(device)
        first = time.perf_counter() - t0
        for _ in range(5):
            one()
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(steps):
            out = one()
        float(out["loss"])
        return steps / (time.perf_counter() - t0), first


def bench_straightforward(preset, split, device, steps):
    cfg = make_config(preset)
    params = {k: v.requires_grad_() for k, v in init_params(cfg, split.dim, None, device).items()}
    step = StraightforwardStep(params, cfg)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, cfg.num_shots, 15)
    gen = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):
        xs, xq, _ = sampler.sample(cfg.batch_size, gen)
        step(xs, xq)
    t0 = time.perf_counter()
    for _ in range(steps):
        xs, xq, _ = sampler.sample(cfg.batch_size, gen)
        loss = step(xs, xq)
    float(loss)
    return steps / (time.perf_counter() - t0)


def bench_eval(split_test, device, compile_):
    cfg = make_config("mini-1shot", compile=compile_)
    params = init_params(cfg, split_test.dim, None, device)
    evaluate(params, cfg, split_test, num_episodes=200, device=device)  # warm-up / compile
    _sync(device)
    result = evaluate(params, cfg, split_test, num_episodes=10_000, device=device)
    return result.wall_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    ap.add_argument("--eager", action="store_true", help="time the eager path, not compiled")
    ap.add_argument(
        "--dim", type=int, default=640, help="embedding dim (640: the paper's; 128: Omniglot's)"
    )
    ap.add_argument(
        "--gradients",
        choices=("explicit", "autograd"),
        default="explicit",
        help="the meta-gradient: hand-derived (leo/explicit.py, default) or vmap + autograd",
    )
    ap.add_argument(
        "--no-prefetch",
        action="store_true",
        help="draw episodes and noise in the training thread (default: on a second thread, "
        "as leo.meta.train does)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (default 1: on a 2-core machine OpenMP threads that wait "
        "for each other make these small kernels several times slower under any other load)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    train = synthetic_split(64, 600, args.dim, noise=0.05, seed=0).to(device)
    test = synthetic_split(20, 600, args.dim, noise=0.05, seed=1, split="test").to(device)
    out = {
        "what": f"SYNTHETIC {args.dim}-d embeddings, miniImageNet's split sizes (speed only)",
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiled": not args.eager,
        "gradients": args.gradients,
        "prefetch": not args.no_prefetch,
    }
    for preset in ("mini-1shot", "mini-5shot"):
        sps, first = bench_leo(
            preset, train, device, args.steps, not args.eager, not args.no_prefetch, args.gradients
        )
        ref = bench_straightforward(preset, train, device, max(args.steps // 4, 10))
        out[preset] = {
            "steps_per_s": round(sps, 1),
            "straightforward_eager_steps_per_s": round(ref, 1),
            "speedup": round(sps / ref, 2),
            "first_call_s": round(first, 1),
        }
    out["eval_10000_episodes_1shot_599_queries_s"] = round(
        bench_eval(test, device, not args.eager), 2
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
