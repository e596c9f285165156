"""Why the fast form writes its masks as floats: compiled CPU kernels and boolean masks.

Prints one JSON object: milliseconds per call, compiled (torch.compile, CPU) and eager, of

- ``mask_store``: relu of a broadcast sum over the 5-shot relation network's activations
  (12 episodes x 25 x 25 pairs x 128), returning its mask as bool or as float32;
- ``relation``: the forward and backward of the relation network's two ReLU layers on the
  same shapes, with ``F.relu`` (the compiler saves a boolean mask for the backward) and
  with :func:`leo.core.model.relu` (a float mask; identical values and gradients).

    python bench/kernels.py [--threads 1] [--repeats 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from leo.core.model import relu  # noqa: E402

B, NK, H = 12, 25, 128  # mini-5shot: 12 episodes, 5 x 5 codes, 2 x 64 relation width


def _ms(fn, repeats):
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - t0) / repeats)
    return round(best * 1e3, 3)


def mask_bool(a, b):
    h = torch.relu(a[:, :, None] + b[:, None, :])
    return h, h <= 0


def mask_float(a, b):
    h = torch.relu(a[:, :, None] + b[:, None, :])
    return h, (h <= 0).float()


def relation_block(act):
    def block(a, b, w):
        h = act(a[:, :, None] + b[:, None, :])
        return act(h @ w).mean(dim=2).sum()

    return block


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    ap.add_argument("--repeats", type=int, default=50, help="calls per timing")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(B, NK, H, generator=gen, requires_grad=True)
    b = torch.randn(B, NK, H, generator=gen, requires_grad=True)
    w = torch.randn(H, H, generator=gen, requires_grad=True) / H**0.5
    out: dict = {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__}
    with torch.no_grad():
        for name, fn in (("bool", mask_bool), ("float", mask_float)):
            compiled = torch.compile(fn)
            out[f"mask_store_{name}"] = {
                "eager_ms": _ms(lambda fn=fn: fn(a, b), args.repeats),
                "compiled_ms": _ms(lambda c=compiled: c(a, b), args.repeats),
            }
    grads = {}
    for name, act in (("F.relu", F.relu), ("leo.core.model.relu", relu)):
        fn = relation_block(act)
        compiled = torch.compile(fn)

        def step(f):
            return torch.autograd.grad(f(a, b, w), [a, b, w])

        grads[name] = step(compiled)
        out[f"relation_fwd_bwd_{name}"] = {
            "eager_ms": _ms(lambda fn=fn: step(fn), args.repeats),
            "compiled_ms": _ms(lambda c=compiled: step(c), args.repeats),
        }
    out["relation_gradients_max_abs_difference"] = max(
        float((x - y).abs().max()) for x, y in zip(*grads.values(), strict=True)
    )
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
