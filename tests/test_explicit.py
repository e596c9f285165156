"""The hand-derived batch meta-gradient (:mod:`leo.core.explicit`) against independent computations.

In float64 on tiny batches: the loop-based plain version of ``tests/plain_leo.py`` (its
own second-order autograd, episode by episode), the vmap + autograd form of
:mod:`leo.core.step`, and central finite differences. Every variant the module covers is
checked: sampling or deterministic, random prior, no dropout, first order, zero steps,
one shot, and decoder and latent stds at their 1e-10 floor.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from plain_leo import plain_episode
from test_model_numerics import D, K, N, Q, small_cfg  # the tiny episode of those tests

from leo.core import explicit
from leo.core.model import decoder_std_offset, init_params
from leo.core.noise import draw_noise
from leo.core.optim import Adam
from leo.core.step import BatchAdapter, MetaStep, batch_adapt, batch_meta_loss

B = 3  # episodes per batch
TOL = 1e-10  # float64, against the same math differently arranged: agreement to rounding
# The plain version recomputes (z - mu) / std for its KL, which at the 1e-10 std floor
# amplifies the rounding of z by up to 1e10: agreement to 1e-7 there.
TOL_PLAIN = 1e-7
pytestmark = pytest.mark.usefixtures("one_thread")


def make_batch(cfg, seed=0, dim=D):
    """float64 params (step sizes randomised so each entry matters), B episodes, noise."""
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.double() for k, v in init_params(cfg, dim, gen).items()}
    params["inner_lr"] = 1.0 + 0.3 * torch.randn(cfg.latent_dim, generator=gen, dtype=torch.float64)
    params["finetune_lr"] = 0.1 + 0.05 * torch.rand(dim, generator=gen, dtype=torch.float64)
    n, k, q = cfg.num_classes, cfg.num_shots, cfg.num_queries
    xs = F.normalize(torch.randn(B, n, k, dim, generator=gen, dtype=torch.float64), dim=-1)
    xq = F.normalize(torch.randn(B, n, q, dim, generator=gen, dtype=torch.float64), dim=-1)
    noise = {key: v.double() for key, v in draw_noise(cfg, B, q, dim, gen).items()}
    return params, xs, xq, noise


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def plain_reference(params, xs, xq, cfg, noise):
    """Mean over episodes of the plain version's meta-loss, its metrics and gradients."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    refs = [
        plain_episode(p, xs[b], xq[b], cfg, {key: v[b] for key, v in noise.items()})
        for b in range(xs.shape[0])
    ]
    loss = sum(r["meta_loss"] for r in refs) / len(refs)
    names = list(p)
    gs = torch.autograd.grad(loss, [p[k] for k in names], allow_unused=True)
    grads = {k: torch.zeros_like(p[k]) if g is None else g for k, g in zip(names, gs, strict=True)}
    terms = {
        key: sum(r[key].item() for r in refs) / len(refs)
        for key in ("query_loss", "kl", "encoder_penalty")
    }
    return loss.item(), terms, grads


VARIANTS = {
    "sampled": {},
    "deterministic": {"deterministic": True},
    "random_prior": {"random_prior": True},
    "random_prior_deterministic": {"random_prior": True, "deterministic": True},
    "no_dropout": {"dropout": 0.0},
    "first_order": {"first_order": True},
    "no_latent_steps": {"inner_steps": 0},
    "no_finetuning": {"finetune_steps": 0},
    "one_shot": {"num_shots": 1},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_metrics_and_gradients_equal_the_plain_version(variant):
    cfg = small_cfg(**VARIANTS[variant])
    params, xs, xq, noise = make_batch(cfg)
    loss, metrics, grads = explicit.loss_and_grads(params, xs, xq, noise, cfg)
    want_loss, want_terms, want_grads = plain_reference(params, xs, xq, cfg, noise)
    assert abs(loss.item() - want_loss) < TOL_PLAIN * max(1.0, abs(want_loss))
    for key, want in want_terms.items():
        assert abs(metrics[key].item() - want) < TOL_PLAIN * max(1.0, abs(want)), key
    assert grads.keys() == params.keys()
    for name, want in want_grads.items():
        unused = (name == "inner_lr" and cfg.inner_steps == 0) or (
            name == "finetune_lr" and cfg.finetune_steps == 0
        )
        if unused:
            assert torch.equal(grads[name], torch.zeros_like(want)), name
            continue
        assert want.abs().max() > 1e-8, f"{name}: reference gradient vanishes"
        err = rel_err(grads[name], want)
        assert err < TOL_PLAIN, f"{name}: {err:.2e}"


@pytest.mark.parametrize("variant", ["sampled", "deterministic", "random_prior", "first_order"])
def test_equal_to_vmap_and_autograd_of_the_fast_form(variant):
    cfg = small_cfg(**VARIANTS[variant])
    params, xs, xq, noise = make_batch(cfg, seed=4)
    p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    want, want_metrics = batch_meta_loss(p, xs, xq, cfg, noise)
    names = list(p)
    want_grads = torch.autograd.grad(want, [p[k] for k in names], materialize_grads=True)
    loss, metrics, grads = explicit.loss_and_grads(params, xs, xq, noise, cfg)
    assert abs(loss.item() - want.item()) < TOL * max(1.0, abs(want.item()))
    for key in ("query_loss", "kl", "encoder_penalty", "accuracy"):
        assert abs(metrics[key].item() - want_metrics[key].item()) < TOL, key
    for name, g in zip(names, want_grads, strict=True):
        assert rel_err(grads[name], g) < TOL, name


def test_stds_at_their_floor_pass_no_gradient_like_the_clamp():
    """Wide decoder scales put many weight stds at 1e-10 (many latent stds are there at
    init already); both masks are exercised. (On most such batches the plain version's
    own gradient is NaN: its KL divides by the 1e-10 std; this seed is one where it is not.)"""
    cfg = small_cfg()
    params, xs, xq, noise = make_batch(cfg, seed=4)
    with torch.no_grad():
        params["decoder.0"][:, D:] *= 6.0
        params["inner_lr"] *= 0.1
    _, _, tape = explicit.forward(params, xs, xq, noise, cfg)
    raw = tape.z0 @ params["decoder.0"][:, D:]
    clamped = (torch.exp(raw) - (1.0 - decoder_std_offset(N, D)) < 1e-10).double().mean()
    assert 0.1 < clamped.item() < 0.9
    latent_clamped = (tape.z_std == 1e-10).double().mean()
    assert 0.1 < latent_clamped.item() < 0.9
    _, _, grads = explicit.loss_and_grads(params, xs, xq, noise, cfg)
    _, _, want = plain_reference(params, xs, xq, cfg, noise)
    for name in want:
        assert torch.isfinite(want[name]).all(), name
        assert rel_err(grads[name], want[name]) < TOL_PLAIN, name


def test_directional_derivatives_match_central_differences():
    """<grad, v> against (L(p + h v) - L(p - h v)) / 2h for every parameter at once."""
    cfg = small_cfg(encoder_penalty_weight=0.0)  # its stop-gradient is not a derivative
    params, xs, xq, noise = make_batch(cfg, seed=5)
    _, _, grads = explicit.loss_and_grads(params, xs, xq, noise, cfg)
    gen = torch.Generator().manual_seed(9)
    h = 1e-6
    for _ in range(3):
        v = {k: torch.randn(p.shape, generator=gen, dtype=torch.float64) for k, p in params.items()}

        def at(sign, v=v):
            shifted = {k: p + sign * h * v[k] for k, p in params.items()}
            return explicit.forward(shifted, xs, xq, noise, cfg)[0].item()

        fd = (at(1.0) - at(-1.0)) / (2 * h)
        analytic = sum((grads[k] * v[k]).sum().item() for k in params)
        assert abs(analytic - fd) < 1e-7 * max(1.0, abs(analytic))


def test_covers_only_the_linear_fast_form_and_meta_step_falls_back_to_autograd():
    assert explicit.covers(small_cfg())
    assert not explicit.covers(small_cfg(hidden_dim=5))
    assert not explicit.covers(small_cfg(form="literal"))
    assert MetaStep(small_cfg()).explicit
    assert not MetaStep(small_cfg(gradients="autograd")).explicit
    assert not MetaStep(small_cfg(hidden_dim=5)).explicit


def test_meta_step_updates_like_the_autograd_path_in_float32():
    cfg = small_cfg(kl_weight=0.1, outer_lr=0.01)
    gen = torch.Generator().manual_seed(3)
    start = init_params(cfg, 16, gen)
    batches = []
    for _ in range(3):
        xs = F.normalize(torch.randn(B, N, K, 16, generator=gen), dim=-1)
        xq = F.normalize(torch.randn(B, N, Q, 16, generator=gen), dim=-1)
        batches.append((xs, xq, draw_noise(cfg, B, Q, 16, gen)))
    runs = {}
    for grads in ("explicit", "autograd"):
        c = dataclasses.replace(cfg, gradients=grads)
        params = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        step, opt = MetaStep(c), Adam(params, c.outer_lr)
        metrics = [step(params, opt, *batch) for batch in batches]
        runs[grads] = (params, metrics)
    (pe, me), (pa, ma) = runs["explicit"], runs["autograd"]
    for a, b in zip(me, ma, strict=True):
        for key in ("loss", "query_loss", "kl", "encoder_penalty", "accuracy"):
            assert abs(a[key].item() - b[key].item()) < 1e-5 * max(1.0, abs(b[key].item())), key
    for name in pe:
        moved = (pa[name] - start[name]).abs().max().item()
        assert moved > 1e-3 or name == "finetune_lr", name
        assert torch.allclose(pe[name], pa[name], rtol=0.0, atol=1e-5), name


@pytest.mark.parametrize("variant", ["sampled", "random_prior", "one_shot"])
def test_evaluation_adaptation_equals_vmap_of_the_model_and_the_plain_version(variant):
    cfg = small_cfg(**VARIANTS[variant], eval_inner_steps=4, eval_finetune_steps=2)
    params, xs, _, _ = make_batch(cfg, seed=6)
    got = explicit.adapt(params, xs, cfg)
    want = batch_adapt(params, xs, cfg)
    for key in ("w_bar", "z_init", "z_adapted"):
        assert got[key].shape == want[key].shape, key
        assert rel_err(got[key], want[key]) < TOL, key
    for b in range(B):
        ref = plain_episode(params, xs[b], xs[b], cfg, None, training=False)
        assert rel_err(got["w_bar"][b], ref["w"].mean(dim=1)) < TOL_PLAIN
    assert BatchAdapter(cfg).fn.func is explicit.adapt
    assert BatchAdapter(small_cfg(hidden_dim=5)).fn.func is batch_adapt
