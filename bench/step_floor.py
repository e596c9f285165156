"""The fastest a meta-training step could run on this machine: its matrix products and its
random numbers alone, at this CPU's measured speed, with every core busy.

For the mini-1shot and mini-5shot presets (batch 12, 5-way, 15 queries, 640-d, SYNTHETIC
embeddings), this records every matrix product (mm, bmm, addmm) one explicit-gradient step
issues (leo/explicit.py: forward and reverse pass, second order), replays each on fresh
tensors of the same shapes and strides and times it (one thread, best of several runs), and
times the step's random numbers (leo/noise.py) and episode sampling. Prints one JSON object:

- ``gflop``: the step's matrix-product work, and ``gemm_ms`` the time those products take
  here, one after another on one core (``gemm_gflop_per_s``: the rate that implies);
- ``noise_ms`` and ``sample_ms``: drawing the batch's noise and episodes;
- ``bound_steps_per_s``: cores / (gemm + noise + sample core-seconds): an upper bound that
  assumes perfect parallelism over all cores and costs nothing else (no elementwise work,
  no reductions, no optimiser, no Python).

    python bench/step_floor.py [--cores 2] [--repeats 20]

The other computations of the same math (vmap + autograd, the straightforward step of
bench/straightforward.py) issue at least these products; the bound holds for them too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leo.core import explicit  # noqa: E402
from leo.core.config import make_config  # noqa: E402
from leo.core.model import init_params  # noqa: E402
from leo.core.noise import draw_noise  # noqa: E402
from leo.data.synthetic import synthetic_split  # noqa: E402
from leo.meta.episodes import EpisodeSampler  # noqa: E402

aten = torch.ops.aten
GEMMS = {aten.mm, aten.bmm, aten.addmm, aten.addmm_, aten.baddbmm}
TARGETS = {"mini-1shot": 150, "mini-5shot": 40}  # issue targets, steps/s on this CPU


def _spec(a):
    return ("tensor", tuple(a.shape), tuple(a.stride())) if isinstance(a, torch.Tensor) else a


class _Recorder(TorchDispatchMode):
    """Counts every matrix-product call by (op, argument shapes and strides, kwargs)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in GEMMS:
            key = (func, tuple(_spec(a) for a in args), tuple(sorted(kwargs.items())))
            self.calls[key] += 1
        return func(*args, **kwargs)


def _fresh(spec, gen):
    if not (isinstance(spec, tuple) and spec and spec[0] == "tensor"):
        return spec
    _, shape, stride = spec
    out = torch.empty_strided(shape, stride)
    # fill the whole storage (a strided view may not cover it all)
    out.as_strided((out.untyped_storage().nbytes() // 4,), (1,), 0).normal_(generator=gen)
    return out


def _flops(func, args) -> int:
    shapes = [a[1] for a in args if isinstance(a, tuple) and a and a[0] == "tensor"]
    name = func.overloadpacket
    if name is aten.mm:
        (m, k), (_, n) = shapes
        return 2 * m * k * n
    if name is aten.bmm:
        (b, m, k), (_, _, n) = shapes
        return 2 * b * m * k * n
    if name in (aten.addmm, aten.addmm_):
        (_, (m, k), (_, n)) = shapes
        return 2 * m * k * n
    (_, (b, m, k), (_, _, n)) = shapes
    return 2 * b * m * k * n


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(preset: str, cores: int, repeats: int) -> dict:
    cfg = make_config(preset, compile=False)
    split = synthetic_split(64, 600, 640, noise=0.05, seed=0)
    params = init_params(cfg, split.dim)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, cfg.num_shots, cfg.num_queries)
    gen = torch.Generator().manual_seed(0)
    xs, xq, _ = sampler.sample(cfg.batch_size, gen)
    noise = draw_noise(cfg, cfg.batch_size, cfg.num_queries, split.dim, gen)
    recorder = _Recorder()
    with recorder:
        explicit.loss_and_grads(params, xs, xq, noise, cfg)
    fill = torch.Generator().manual_seed(1)
    gemm_s, flops, calls = 0.0, 0, 0
    for (func, args, kwargs), count in recorder.calls.items():
        live = [_fresh(a, fill) for a in args]
        kw = dict(kwargs)
        per_call = _best_seconds(lambda f=func, a=live, k=kw: f(*a, **k), repeats)
        gemm_s += count * per_call
        flops += count * _flops(func, args)
        calls += count
    noise_s = _best_seconds(
        lambda: draw_noise(cfg, cfg.batch_size, cfg.num_queries, split.dim, gen), repeats
    )
    sample_s = _best_seconds(lambda: sampler.sample(cfg.batch_size, gen), repeats)
    core_s = gemm_s + noise_s + sample_s
    return {
        "gemm_calls": calls,
        "gflop": round(flops / 1e9, 3),
        "gemm_ms": round(gemm_s * 1e3, 2),
        "gemm_gflop_per_s": round(flops / gemm_s / 1e9, 1),
        "noise_ms": round(noise_s * 1e3, 2),
        "sample_ms": round(sample_s * 1e3, 2),
        "bound_steps_per_s": round(cores / core_s, 1),
        "target_steps_per_s": TARGETS[preset],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cores", type=int, default=os.cpu_count(), help="cores the bound assumes")
    ap.add_argument("--repeats", type=int, default=20, help="timings per product (best kept)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = {
        "what": "SYNTHETIC embeddings of the miniImageNet shape (speed only)",
        "cores": args.cores,
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for preset in TARGETS:
        out[preset] = measure(preset, args.cores, args.repeats)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
