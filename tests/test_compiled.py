"""``MetaStep`` under ``torch.compile``: the same numbers as eager, and compiled only once.

One compilation per gradient path for the whole file (a module fixture): the explicit
gradients (the default) and vmap + autograd, on a deliberately tiny problem (N=3, K=2,
Q=2, D=16, Z=4, one latent and one fine-tuning step, batch 2): a cold Inductor compile
costs about 70 s of CPU here (63 C++ kernels: 55 s of them g++; measured 2026-12-02 on the
2-core VM), a warm FX-graph cache a few seconds.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from leo.core.config import make_config
from leo.core.model import init_params
from leo.core.noise import draw_noise
from leo.core.optim import Adam
from leo.core.step import MetaStep, batch_meta_loss

DIM, BATCH = 16, 2


def _graph_stats() -> tuple[int, int]:
    """(graphs captured, frames compiled) so far in this process."""
    # imported here, not at collection: a second for each pytest-xdist worker
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], counters["frames"]["ok"]


@pytest.fixture(scope="module")
def steps():
    """Two outer steps, compiled and eager, from the same start and the same noise."""
    before_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny kernels; OpenMP spinning on a shared box only costs
    cfg = make_config(
        "default",
        num_classes=3,
        num_shots=2,
        num_queries=2,
        latent_dim=4,
        inner_steps=1,
        finetune_steps=1,
        outer_lr=0.01,
        kl_weight=0.1,
        encoder_penalty_weight=0.1,
        batch_size=BATCH,
        form="fast",
        compile=True,
    )
    gen = torch.Generator().manual_seed(0)
    start = init_params(cfg, DIM, gen)

    def batch():
        xs = F.normalize(torch.randn(BATCH, 3, 2, DIM, generator=gen), dim=-1)
        xq = F.normalize(torch.randn(BATCH, 3, 2, DIM, generator=gen), dim=-1)
        return xs, xq, draw_noise(cfg, BATCH, 2, DIM, gen)

    batches = [batch(), batch()]
    runs = {}
    stats = [_graph_stats()]
    configs = (
        ("compiled", cfg),
        ("compiled_autograd", dataclasses.replace(cfg, gradients="autograd")),
        ("eager", dataclasses.replace(cfg, compile=False)),
    )
    for name, c in configs:
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        step, opt = MetaStep(c), Adam(params, c.outer_lr)
        metrics = []
        for i, (xs, xq, noise) in enumerate(batches):
            if name != "eager" and i > 0:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    metrics.append(step(params, opt, xs, xq, noise))
            else:
                metrics.append(step(params, opt, xs, xq, noise))
            if name == "compiled":
                stats.append(_graph_stats())
        runs[name] = {"params": params, "metrics": metrics, "step": step}
    yield {"cfg": cfg, "start": start, "batches": batches, "runs": runs, "stats": stats}
    torch.set_num_threads(before_threads)


@pytest.mark.parametrize("run", ["compiled", "compiled_autograd"])
def test_compiled_meta_step_updates_params_like_eager(steps, run):
    compiled, eager = steps["runs"][run], steps["runs"]["eager"]
    assert compiled["step"].explicit == (run == "compiled")
    for mc, me in zip(compiled["metrics"], eager["metrics"], strict=True):
        for key in ("loss", "query_loss", "kl", "encoder_penalty", "accuracy"):
            assert abs(mc[key].item() - me[key].item()) < 1e-5 * max(1.0, abs(me[key].item()))
    for name, p in compiled["params"].items():
        assert torch.allclose(p, eager["params"][name], rtol=0.0, atol=1e-5), name
        moved = (p - steps["start"][name]).abs().max().item()
        assert moved > 1e-3 or name == "finetune_lr", name  # two Adam steps of lr 0.01


def test_compiled_explicit_gradients_match_eager(steps):
    params = steps["runs"]["compiled"]["params"]
    xs, xq, noise = steps["batches"][0]
    before = _graph_stats()
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss_c, _, g_c = steps["runs"]["compiled"]["step"].gradients(params, xs, xq, noise)
    assert _graph_stats() == before  # third call, new values, same shapes: cached
    eager = MetaStep(dataclasses.replace(steps["cfg"], compile=False))
    loss_e, _, g_e = eager.gradients(params, xs, xq, noise)
    assert abs(loss_c.item() - loss_e.item()) < 1e-5 * max(1.0, abs(loss_e.item()))
    for name, b in g_e.items():
        assert b.abs().max() > 1e-6, name
        assert (g_c[name] - b).abs().max() <= 1e-5 * b.abs().max(), name


def test_compiled_loss_gradients_match_eager(steps):
    # Adam's first steps are nearly sign(g); compare the gradients themselves as well.
    params = steps["runs"]["compiled_autograd"]["params"]
    xs, xq, noise = steps["batches"][0]
    before = _graph_stats()
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss_c, _ = steps["runs"]["compiled_autograd"]["step"].loss_fn(params, xs, xq, noise=noise)
    assert _graph_stats() == before  # third call, new values, same shapes: cached
    loss_e, _ = batch_meta_loss(
        params, xs, xq, dataclasses.replace(steps["cfg"], compile=False), noise
    )
    assert abs(loss_c.item() - loss_e.item()) < 1e-5 * max(1.0, abs(loss_e.item()))
    names = list(params)
    g_c = torch.autograd.grad(loss_c, [params[k] for k in names])
    g_e = torch.autograd.grad(loss_e, [params[k] for k in names])
    for name, a, b in zip(names, g_c, g_e, strict=True):
        assert b.abs().max() > 1e-6, name
        assert (a - b).abs().max() <= 1e-5 * b.abs().max(), name


def test_second_compiled_call_does_not_recompile(steps):
    first, after_one, after_two = steps["stats"]
    assert after_one[0] - first[0] == 1  # one graph, no graph breaks
    assert after_one[1] - first[1] == 1
    assert after_two == after_one  # same shapes, new values: no new frame, no new graph
