"""The outer update (docs/model.md, point 11): NaN fallback, clipping order, TF-style Adam.

Expected values are written out by hand (the TF1 formulas), and one full ``MetaStep`` is
compared with the plain episode of ``tests/plain_leo.py`` followed by hand clipping and
the hand Adam.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from plain_leo import plain_episode

from leo.core.config import make_config
from leo.core.model import init_params, l2_penalty
from leo.core.noise import draw_noise
from leo.core.optim import Adam, clip_gradients, nan_fallback
from leo.core.step import MetaStep

NETWORK = ("encoder.0", "relation.0", "relation.1", "relation.2", "decoder.0")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (OpenMP spinning is costly on a shared box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def some_params(seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random LEO-shaped parameters (D=5, Z=3)."""
    cfg = make_config("default", latent_dim=3)
    gen = torch.Generator().manual_seed(seed)
    params = init_params(cfg, 5, gen)
    params["inner_lr"] = params["inner_lr"] + 0.1 * torch.randn(3, generator=gen)
    return {k: v.to(dtype) for k, v in params.items()}


def some_grads(params, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}


# ----------------------------------------------------------------------------- NaN fallback
def test_nan_loss_replaces_gradients_by_those_of_the_l2_pull():
    params, grads = some_params(), some_grads(some_params())
    out = nan_fallback(params, torch.tensor(float("nan")), grads)
    for name in NETWORK:
        assert torch.allclose(out[name], 1e-4 * params[name], rtol=1e-6, atol=0.0), name
    for name in ("inner_lr", "finetune_lr"):
        assert torch.count_nonzero(out[name]) == 0, name
    # The same as differentiating (1e-4 / lambda1) * (lambda1 * L2), as docs/model.md, point 11.
    lam = 3.6e-10
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    penalty = (1e-4 / lam) * (lam * l2_penalty(leaves))
    auto = torch.autograd.grad(penalty, list(leaves.values()), allow_unused=True)
    for (name, g), a in zip(out.items(), auto, strict=True):
        want = torch.zeros_like(g) if a is None else a
        assert torch.allclose(g, want, rtol=1e-5, atol=1e-12), name


def test_a_nan_in_any_single_gradient_triggers_the_fallback():
    params = some_params()
    grads = some_grads(params)
    grads["finetune_lr"] = grads["finetune_lr"].clone()
    grads["finetune_lr"][2] = float("nan")
    out = nan_fallback(params, torch.tensor(0.7), grads)
    assert torch.allclose(out["decoder.0"], 1e-4 * params["decoder.0"], rtol=1e-6, atol=0.0)
    assert torch.count_nonzero(out["finetune_lr"]) == 0
    assert all(torch.isfinite(g).all() for g in out.values())


def test_finite_loss_and_gradients_pass_through_unchanged():
    params = some_params()
    grads = some_grads(params)
    out = nan_fallback(params, torch.tensor(2.5), grads)
    assert all(torch.equal(out[k], grads[k]) for k in grads)


# ----------------------------------------------------------------------------- clipping
def test_clipping_is_by_value_first_then_by_each_tensors_norm():
    g = torch.tensor([10.0, 0.01])
    out = clip_gradients({"a": g, "b": torch.tensor([0.03, -0.04])}, value=0.1, norm=0.1)
    by_value = torch.tensor([0.1, 0.01])  # then its norm sqrt(0.0101) > 0.1 is scaled to 0.1
    want = by_value * (0.1 / math.sqrt(0.0101))
    assert torch.allclose(out["a"], want, rtol=1e-6, atol=0.0)
    # The other order (norm, then value) would leave [~0.1, ~1e-4]: 100x smaller 2nd entry.
    other = (g * 0.1 / torch.linalg.vector_norm(g)).clamp(-0.1, 0.1)
    assert abs(out["a"][1].item() - other[1].item()) > 5e-3
    # Per tensor, not global: "b" (norm 0.05) is untouched although "a" was clipped.
    assert torch.equal(out["b"], torch.tensor([0.03, -0.04]))
    # Thresholds of 0 switch clipping off.
    off = clip_gradients({"a": g}, value=0.0, norm=0.0)
    assert torch.equal(off["a"], g)


def test_norm_clip_alone_is_tf_clip_by_norm():
    g = torch.tensor([[3.0, 4.0], [0.0, 12.0]])  # norm 13
    out = clip_gradients({"g": g}, value=0.0, norm=1.3)
    assert torch.allclose(out["g"], g * 0.1, rtol=1e-6, atol=0.0)


# ----------------------------------------------------------------------------- Adam
def tf_adam(w, grads_seq, lr, b1=0.9, b2=0.999, eps=1e-8):
    """tf.train.AdamOptimizer, written out: the sequence of weights after each step."""
    m, v, out = 0.0 * w, 0.0 * w, []
    for t, g in enumerate(grads_seq, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr_t = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
        w = w - lr_t * m / (torch.sqrt(v) + eps)
        out.append(w)
    return out


def test_adam_equals_the_tensorflow_update_not_pytorchs():
    gen = torch.Generator().manual_seed(2)
    w0 = torch.randn(6, generator=gen, dtype=torch.float64)
    # Gradients from O(1) down to 1e-7, where the placement of eps matters.
    scale = torch.tensor([1.0, 0.3, 1e-3, 1e-5, 1e-7, 3e-8], dtype=torch.float64)
    seq = [scale * torch.randn(6, generator=gen, dtype=torch.float64) for _ in range(4)]
    want = tf_adam(w0, seq, lr=0.01)
    params = {"w": w0.clone()}
    opt = Adam(params, lr=0.01)
    for t, g in enumerate(seq):
        opt.step(params, {"w": g})
        assert torch.allclose(params["w"], want[t], rtol=0.0, atol=1e-14), t
    # PyTorch's formula (eps added after the bias correction) lands elsewhere on tiny
    # gradients: the test can tell the two apart.
    m, v, torch_w = 0.0 * w0, 0.0 * w0, w0.clone()
    for t, g in enumerate(seq, start=1):
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        torch_w = torch_w - 0.01 * (m / (1 - 0.9**t)) / (torch.sqrt(v / (1 - 0.999**t)) + 1e-8)
    assert (torch_w - want[-1]).abs().max() > 1e-4


def test_adam_state_dict_resumes_exactly():
    gen = torch.Generator().manual_seed(3)
    seq = [{"w": torch.randn(4, generator=gen)} for _ in range(4)]
    a = {"w": torch.zeros(4)}
    opt_a = Adam(a, lr=0.1)
    for g in seq:
        opt_a.step(a, g)
    b = {"w": torch.zeros(4)}
    opt_b = Adam(b, lr=0.1)
    for g in seq[:2]:
        opt_b.step(b, g)
    opt_c = Adam(b, lr=0.1)
    opt_c.load_state_dict(opt_b.state_dict())
    for g in seq[2:]:
        opt_c.step(b, g)
    assert torch.equal(a["w"], b["w"])


# ----------------------------------------------------------------------------- MetaStep
def tiny_setup(dtype, seed=0, **overrides):
    """A 2-episode batch: N=3, K=2, Q=2, D=8, Z=4, eager."""
    kw = dict(
        num_classes=3,
        num_shots=2,
        num_queries=2,
        latent_dim=4,
        inner_steps=2,
        finetune_steps=2,
        outer_lr=0.01,
        kl_weight=0.1,
        encoder_penalty_weight=0.1,
        compile=False,
    )
    cfg = make_config("default", **{**kw, **overrides})
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.to(dtype).requires_grad_(True) for k, v in init_params(cfg, 8, gen).items()}
    xs = F.normalize(torch.randn(2, 3, 2, 8, generator=gen, dtype=dtype), dim=-1)
    xq = F.normalize(torch.randn(2, 3, 2, 8, generator=gen, dtype=dtype), dim=-1)
    noise = {k: v.to(dtype) for k, v in draw_noise(cfg, 2, 2, 8, gen).items()}
    return cfg, params, xs, xq, noise


def test_meta_step_with_a_nan_episode_pulls_weights_to_zero_and_stays_finite():
    cfg, params, xs, xq, noise = tiny_setup(torch.float32)
    before = {k: v.detach().clone() for k, v in params.items()}
    xs = xs.clone()
    xs[1, 0, 0, 3] = float("nan")  # one poisoned support embedding in episode 1
    metrics = MetaStep(cfg)(params, Adam(params, cfg.outer_lr), xs, xq, noise)
    assert torch.isnan(metrics["loss"])  # reported, not hidden
    for name, w in params.items():
        assert torch.isfinite(w).all(), name
    for name in ("inner_lr", "finetune_lr"):
        assert torch.equal(params[name].detach(), before[name]), name
    for name in NETWORK:  # first Adam step on g = 1e-4 w (within both clip thresholds)
        g = 1e-4 * before[name]
        assert torch.linalg.vector_norm(g) < 0.1
        want = tf_adam(before[name], [g], lr=cfg.outer_lr)[0]
        assert torch.allclose(params[name].detach(), want, rtol=1e-5, atol=1e-7), name
        assert params[name].detach().abs().sum() < before[name].abs().sum()
    # The next, clean step is an ordinary finite update.
    _, _, xs_ok, _, _ = tiny_setup(torch.float32)
    metrics = MetaStep(cfg)(params, Adam(params, cfg.outer_lr), xs_ok, xq, noise)
    assert torch.isfinite(metrics["loss"])


def hand_clip(g: torch.Tensor, value: float, norm: float) -> torch.Tensor:
    g = g.clamp(-value, value)
    n = torch.linalg.vector_norm(g).item()
    return g * (norm / n) if n > norm else g


def test_meta_step_equals_plain_gradients_hand_clipping_and_tf_adam():
    cfg, params, xs, xq, noise = tiny_setup(torch.float64, seed=4, gradient_threshold=0.05)
    start = {k: v.detach().clone() for k, v in params.items()}
    step, opt = MetaStep(cfg), Adam(params, cfg.outer_lr)
    noises = [noise, tiny_setup(torch.float64, seed=5)[4]]
    for nz in noises:
        step(params, opt, xs, xq, nz)

    # Independent: plain episodes, mean over the batch, then hand clip and hand Adam.
    w = {k: v.clone().requires_grad_(True) for k, v in start.items()}
    seqs = {k: [] for k in w}
    for t, nz in enumerate(noises):
        loss = sum(
            plain_episode(w, xs[b], xq[b], cfg, {k: v[b] for k, v in nz.items()})["meta_loss"]
            for b in range(2)
        )
        # plain meta_loss holds the regularisers once per episode: mean of the sum is right.
        gs = torch.autograd.grad(loss / 2, list(w.values()))
        for k, g in zip(w, gs, strict=True):
            seqs[k].append(hand_clip(g, 0.05, 0.1))
        with torch.no_grad():
            for k in w:
                w[k].copy_(tf_adam(start[k], seqs[k], lr=cfg.outer_lr)[t])
    # Adam normalises each entry, so the ~1e-9 relative difference of the two KL forms at
    # clamped stds (eps vs (z - mu) / std with std = 1e-10) shows up as ~1e-9 absolute.
    for k in params:
        assert torch.allclose(params[k].detach(), w[k].detach(), rtol=0.0, atol=1e-7), k
        assert (params[k].detach() - start[k]).abs().max() > 1e-3, k  # it really moved
