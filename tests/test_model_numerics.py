"""The LEO math of :mod:`leo.core.model` against an independent plain version, hand values and FD.

Everything runs in float64 on tiny episodes (N=3, K=2, D=6, Z=4) so that disagreements at
the 1e-5 level mean a real difference, not rounding. ``tests/plain_leo.py`` is the
independent yardstick (loops, second-order ``torch.autograd.grad``, full (N, K, D)
fine-tuning); the same pre-drawn noise dict feeds both implementations.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from plain_leo import mlp_on_vector, orthogonality, plain_episode, summed_support_loss

from leo.core.config import LEOConfig, make_config
from leo.core.model import (
    adapt,
    decoder_std_offset,
    episode_loss,
    gaussian_std,
    gaussian_std_parts,
    init_params,
    l2_penalty,
    meta_loss,
    orthogonality_penalty,
    positive,
    relation_fast,
    relation_literal,
    relu,
    support_grad_wbar,
    support_loss,
)
from leo.core.noise import draw_noise
from leo.core.step import batch_adapt, batch_meta_loss

N, K, D, Q, Z = 3, 2, 6, 3, 4
FORMS = ("literal", "fast")
TOL = 1e-5  # agreement asked of the model and the plain version (float64)


# ----------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread (on a shared 2-core box, OpenMP spinning made
    every small kernel ~50x slower); the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small_cfg(**overrides) -> LEOConfig:
    """A tiny episode with loss weights large enough that every term moves the gradient."""
    base = dict(
        num_classes=N,
        num_shots=K,
        num_queries=Q,
        latent_dim=Z,
        dropout=0.3,
        inner_steps=3,
        finetune_steps=3,
        kl_weight=0.5,
        encoder_penalty_weight=0.3,
        l2_penalty_weight=1e-2,
        orthogonality_penalty_weight=0.2,
        compile=False,
    )
    return make_config("default", **{**base, **overrides})


def make_episode(cfg: LEOConfig, seed: int = 0, dim: int = D):
    """float64 params (grad on), L2-normalised support (N, K, D) / query (N, Q, D), noise.

    The step sizes are randomised (inner_lr around 1, finetune_lr around 0.1) so that each
    per-dimension entry matters and fine-tuning contributes to the meta-gradient.
    """
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.double() for k, v in init_params(cfg, dim, gen).items()}
    zdim = cfg.latent_dim
    params["inner_lr"] = 1.0 + 0.3 * torch.randn(zdim, generator=gen, dtype=torch.float64)
    params["finetune_lr"] = 0.1 + 0.05 * torch.rand(dim, generator=gen, dtype=torch.float64)
    for v in params.values():
        v.requires_grad_(True)
    n, k, q = cfg.num_classes, cfg.num_shots, cfg.num_queries
    xs = F.normalize(torch.randn(n, k, dim, generator=gen, dtype=torch.float64), dim=-1)
    xq = F.normalize(torch.randn(n, q, dim, generator=gen, dtype=torch.float64), dim=-1)
    noise = {key: v[0].double() for key, v in draw_noise(cfg, 1, q, dim, gen).items()}
    return params, xs, xq, noise


def model_loss(params, xs, xq, cfg, noise):
    """The model's per-episode meta-loss (points 1-10)."""
    q, kl, pen, _ = episode_loss(params, xs, xq, cfg, noise)
    return meta_loss(params, q, kl, pen, cfg)


@torch.no_grad()
def loss_value(params, xs, xq, cfg, noise) -> float:
    """:func:`model_loss` as a number, for finite differences (the inner loops still run)."""
    return model_loss(params, xs, xq, cfg, noise).item()


def eval_query_loss(w_bar: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """Mean query cross-entropy under w_bar (N, D), no dropout."""
    n, q, d = xq.shape
    labels = torch.arange(n).repeat_interleave(q)
    return F.cross_entropy(xq.reshape(n * q, d) @ w_bar.T, labels)


def model_eval_loss(params, xs, xq, cfg):
    """An evaluation-mode objective through :func:`adapt` (means, no dropout) + regularisers."""
    out = adapt(params, xs, cfg, training=False)
    return (
        eval_query_loss(out["w_bar"], xq)
        + cfg.l2_penalty_weight * l2_penalty(params)
        + cfg.orthogonality_penalty_weight * orthogonality_penalty(params)
    )


def grads(loss: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
    """d loss / d every parameter (zeros where unused)."""
    names = list(params)
    gs = torch.autograd.grad(loss, [params[k] for k in names], allow_unused=True)
    pairs = zip(names, gs, strict=True)
    return {k: torch.zeros_like(params[k]) if g is None else g for k, g in pairs}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (b the reference)."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def assert_grads_agree(got: dict, want: dict, tol: float = TOL, nonzero: bool = True) -> None:
    """Every gradient within ``tol`` of the reference, relative to the reference's max."""
    assert got.keys() == want.keys()
    for name in want:
        if nonzero:
            assert want[name].abs().max() > 1e-6, f"{name}: reference gradient vanishes"
        err = rel_err(got[name], want[name])
        assert err < tol, f"{name}: relative gradient error {err:.3e}"


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-12) -> bool:
    """max |a - b| <= tol (absolute; no relative slack)."""
    return a.shape == b.shape and (a - b).abs().max().item() <= tol


def clamped_fraction(raw: torch.Tensor, offset: float) -> float:
    """Share of entries whose std exp(raw) - (1 - offset) is at the 1e-10 floor."""
    return (torch.exp(raw.detach()) - (1.0 - offset) < 1e-10).double().mean().item()


def perturbed(params: dict, name: str, delta: torch.Tensor) -> dict:
    """Detached copy of params with ``delta`` added to one tensor."""
    out = {k: v.detach().clone() for k, v in params.items()}
    out[name] = out[name] + delta
    return out


# ----------------------------------------------------------------------------- plain vs model
@pytest.mark.parametrize("form", FORMS)
def test_stochastic_episode_matches_plain_loss_terms_and_second_order_gradients(form):
    cfg = small_cfg(form=form)
    params, xs, xq, noise = make_episode(cfg)
    ref = plain_episode(params, xs, xq, cfg, noise)
    q, kl, pen, _ = episode_loss(params, xs, xq, cfg, noise)
    loss = meta_loss(params, q, kl, pen, cfg)
    for got, want in ((q, "query_loss"), (kl, "kl"), (pen, "encoder_penalty")):
        assert abs(got.item() - ref[want].item()) < TOL * max(1.0, abs(ref[want].item())), want
    assert abs(loss.item() - ref["meta_loss"].item()) < TOL
    assert kl.item() != 0.0 and pen.item() > 0.0  # the terms are really exercised
    codes = (xs * noise["enc_keep"]) @ params["encoder.0"]
    clamped = clamped_fraction(relation_fast(params, codes)[:, Z:], 0.0)
    assert 0.1 < clamped < 0.9  # both branches of the latent std's clamp are exercised
    assert_grads_agree(grads(loss, params), grads(ref["meta_loss"], params))


@pytest.mark.parametrize("form", FORMS)
def test_clamped_decoder_std_matches_plain(form):
    """Weight samples whose std hits the 1e-10 floor (no gradient through their scale)."""
    cfg = small_cfg(form=form)
    params, xs, xq, noise = make_episode(cfg)
    with torch.no_grad():
        params["decoder.0"][:, D:] *= 6.0  # wide raw scales: some fall below the floor
        params["inner_lr"] *= 0.1  # ... and a gentler latent step keeps the loop stable
    ref = plain_episode(params, xs, xq, cfg, noise)
    for z in (ref["z_init"], ref["z_adapted"]):
        raw = (z.detach() @ params["decoder.0"].detach())[..., D:]
        assert 0.1 < clamped_fraction(raw, decoder_std_offset(N, D)) < 0.9
    loss = model_loss(params, xs, xq, cfg, noise)
    assert abs(loss.item() - ref["meta_loss"].item()) < TOL * abs(ref["meta_loss"].item())
    assert_grads_agree(grads(loss, params), grads(ref["meta_loss"], params))


@pytest.mark.parametrize("form", FORMS)
def test_deterministic_episode_matches_plain(form):
    cfg = small_cfg(form=form, deterministic=True)
    params, xs, xq, noise = make_episode(cfg)
    assert "z_eps" not in noise and "w_eps" not in noise  # only dropout masks are drawn
    ref = plain_episode(params, xs, xq, cfg, noise)
    q, kl, pen, _ = episode_loss(params, xs, xq, cfg, noise)
    loss = meta_loss(params, q, kl, pen, cfg)
    assert kl.item() == 0.0 and ref["kl"].item() == 0.0
    assert abs(loss.item() - ref["meta_loss"].item()) < TOL
    assert abs(pen.item() - ref["encoder_penalty"].item()) < TOL
    assert_grads_agree(grads(loss, params), grads(ref["meta_loss"], params))


@pytest.mark.parametrize("form", FORMS)
def test_evaluation_mode_matches_plain_and_uses_eval_step_counts(form):
    cfg = small_cfg(form=form, eval_inner_steps=4, eval_finetune_steps=2)
    params, xs, xq, _ = make_episode(cfg)
    ref = plain_episode(params, xs, xq, cfg, None, training=False)
    # 4 latent evaluations + 2 fine-tuning evaluations + the final weights.
    assert len(ref["support_losses"]) == 4 + 2 + 1
    out = adapt(params, xs, cfg, training=False)
    assert rel_err(out["z_init"], ref["z_init"]) < TOL
    assert rel_err(out["z_adapted"], ref["z_adapted"]) < TOL
    assert rel_err(out["w_bar"], ref["w"].mean(dim=1)) < TOL
    loss = model_eval_loss(params, xs, xq, cfg)
    assert abs(loss.item() - ref["meta_loss"].item()) < TOL
    assert_grads_agree(grads(loss, params), grads(ref["meta_loss"], params))
    # A different number of evaluation steps gives different weights (the counts are used).
    other = adapt(params, xs, dataclasses.replace(cfg, eval_inner_steps=3), training=False)
    assert rel_err(other["w_bar"], out["w_bar"]) > 1e-3


@pytest.mark.parametrize("form", FORMS)
def test_batched_vmap_loss_is_the_mean_of_plain_episodes_and_adapts_each(form):
    cfg = small_cfg(form=form)
    episodes = [make_episode(cfg, seed=s) for s in (1, 2)]
    params = episodes[0][0]
    xs = torch.stack([e[1] for e in episodes])
    xq = torch.stack([e[2] for e in episodes])
    noise = {key: torch.stack([e[3][key] for e in episodes]) for key in episodes[0][3]}
    loss, metrics = batch_meta_loss(params, xs, xq, cfg, noise)
    refs = [plain_episode(params, e[1], e[2], cfg, e[3]) for e in episodes]
    want = sum(r["meta_loss"] for r in refs) / 2
    assert abs(loss.item() - want.item()) < TOL
    assert abs(metrics["kl"].item() - sum(r["kl"].item() for r in refs) / 2) < TOL
    assert_grads_agree(grads(loss, params), grads(want, params))
    adapted = batch_adapt(params, xs, cfg)["w_bar"]  # evaluation, vmapped
    for b, e in enumerate(episodes):
        ref = plain_episode(params, e[1], e[2], cfg, None, training=False)
        assert rel_err(adapted[b], ref["w"].mean(dim=1)) < TOL


# ----------------------------------------------------------------------------- first order
@pytest.mark.parametrize("form", FORMS)
def test_first_order_keeps_the_loss_but_changes_the_gradient(form):
    cfg = small_cfg(form=form)
    first = dataclasses.replace(cfg, first_order=True)
    params, xs, xq, noise = make_episode(cfg)
    exact = model_loss(params, xs, xq, cfg, noise)
    approx = model_loss(params, xs, xq, first, noise)
    assert abs(exact.item() - approx.item()) < 1e-12
    g_exact, g_approx = grads(exact, params), grads(approx, params)
    # The second-order terms are not small: the decoder's gradient moves by O(1) relative.
    assert rel_err(g_approx["decoder.0"], g_exact["decoder.0"]) > 1e-2
    assert rel_err(g_approx["inner_lr"], g_exact["inner_lr"]) > 1e-2
    # ... and the first-order gradient is the plain version's first-order gradient.
    ref = plain_episode(params, xs, xq, first, noise)
    assert_grads_agree(g_approx, grads(ref["meta_loss"], params))


# ----------------------------------------------------------------------------- finite differences
# The encoder penalty's stop-gradient makes autograd differ from a finite difference on
# purpose (see the penalty test below), so these checks set gamma = 0.
def test_step_size_and_decoder_gradients_match_central_differences():
    """Every entry of d/d(inner_lr) and d/d(finetune_lr), and the decoder along directions."""
    cfg = small_cfg(form="fast", encoder_penalty_weight=0.0)
    params, xs, xq, noise = make_episode(cfg, seed=3)
    g = grads(model_loss(params, xs, xq, cfg, noise), params)
    h = 1e-5
    for name in ("inner_lr", "finetune_lr"):  # every entry of the step-size vectors
        fd = torch.zeros_like(params[name])
        for idx in range(params[name].numel()):
            e = torch.zeros(params[name].numel(), dtype=torch.float64)
            e[idx] = h
            e = e.reshape(params[name].shape)
            up = loss_value(perturbed(params, name, e), xs, xq, cfg, noise)
            down = loss_value(perturbed(params, name, -e), xs, xq, cfg, noise)
            fd.view(-1)[idx] = (up - down) / (2 * h)
        assert g[name].abs().max() > 1e-4, name
        assert rel_err(g[name], fd) < 1e-6, f"{name}: {rel_err(g[name], fd):.2e}"
    gen = torch.Generator().manual_seed(14)
    for _ in range(3):  # the decoder along random directions
        v = torch.randn(Z, 2 * D, generator=gen, dtype=torch.float64)
        up = loss_value(perturbed(params, "decoder.0", h * v), xs, xq, cfg, noise)
        down = loss_value(perturbed(params, "decoder.0", -h * v), xs, xq, cfg, noise)
        analytic = (g["decoder.0"] * v).sum().item()
        assert abs(analytic - (up - down) / (2 * h)) < 1e-6 * max(1.0, abs(analytic))


@pytest.mark.parametrize("impl", ("literal", "plain"))
def test_directional_derivatives_of_every_parameter_match_central_differences(impl):
    cfg = small_cfg(form="literal", encoder_penalty_weight=0.0)
    params, xs, xq, noise = make_episode(cfg, seed=4)

    def f(p):
        if impl == "plain":
            return plain_episode(p, xs, xq, cfg, noise)["meta_loss"]
        return model_loss(p, xs, xq, cfg, noise)

    g = grads(f(params), params)
    gen = torch.Generator().manual_seed(5)
    h = 1e-5
    for name in params:
        v = torch.randn(params[name].shape, generator=gen, dtype=torch.float64)
        analytic = (g[name] * v).sum().item()
        with torch.no_grad():  # torch.func.grad and the plain version's loops ignore it
            fd = (f(perturbed(params, name, h * v)) - f(perturbed(params, name, -h * v))).item()
        fd /= 2 * h
        assert abs(analytic - fd) < 1e-6 * max(1.0, abs(fd)), f"{name}: {analytic} vs {fd}"


@pytest.mark.parametrize("form", FORMS)
def test_encoder_penalty_stops_the_gradient_of_the_adapted_latents(form):
    cfg = small_cfg(form=form)
    params, xs, _, noise = make_episode(cfg, seed=6)

    @torch.no_grad()
    def penalty_value(p, frozen):
        return penalty(p, frozen)[1].item()

    def penalty(p, frozen=None):
        out = adapt(p, xs, cfg, training=True, noise=noise)
        target = out["z_adapted"] if frozen is None else frozen
        return out["encoder_penalty"], ((target.detach() - out["z_init"]) ** 2).mean(), out

    pen, _, out = penalty(params)
    g = grads(pen, params)
    # z_init does not depend on the step sizes or the decoder: no gradient reaches them ...
    for name in ("inner_lr", "finetune_lr", "decoder.0"):
        assert torch.count_nonzero(g[name]) == 0, name
    h = 1e-5
    e = torch.zeros(Z, dtype=torch.float64)
    e[0] = h
    fd = (
        penalty(perturbed(params, "inner_lr", e))[0] - penalty(perturbed(params, "inner_lr", -e))[0]
    )
    assert abs(fd.item() / (2 * h)) > 1e-4  # ... though the penalty's value does depend on them
    # The encoder's gradient is that of mean((const - z_init(phi))^2), the adapted z frozen.
    frozen = out["z_adapted"].detach()
    gen = torch.Generator().manual_seed(13)
    for name in ("encoder.0", "relation.0", "relation.2"):
        v = torch.randn(params[name].shape, generator=gen, dtype=torch.float64)
        up = penalty_value(perturbed(params, name, h * v), frozen)
        down = penalty_value(perturbed(params, name, -h * v), frozen)
        assert abs((g[name] * v).sum().item() - (up - down) / (2 * h)) < 1e-8, name
        assert g[name].abs().max() > 1e-4, name


# ----------------------------------------------------------------------------- hand values
A = 2.0 * math.log(1.5)  # relation scale: latent raw = A / 2, so std = exp(A / 2) - 1 = 0.5


def hand_params(inner_lr=(0.5, 2.0), finetune_lr=(0.3, 0.7)) -> dict[str, torch.Tensor]:
    """N=2, K=1, D=Z=2 with identity maps.

    Codes c = x; relation(c_i, c_j) = [c_i, A c_j], so after the averages mu_n = x_n and
    raw = A * mean(x) = A/2 per latent for x = e_0, e_1; the decoder's mean part is the
    identity and its raw part 0, so decoded weights are w = z + sqrt(2 / (N + D)) * eps.
    """
    eye2, eye4 = torch.eye(2, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    rel2 = torch.block_diag(eye2, A * eye2)
    return {
        "encoder.0": eye2.clone(),
        "relation.0": eye4.clone(),
        "relation.1": eye4.clone(),
        "relation.2": rel2,
        "decoder.0": torch.cat([eye2, torch.zeros(2, 2, dtype=torch.float64)], dim=1),
        "inner_lr": torch.tensor(inner_lr, dtype=torch.float64),
        "finetune_lr": torch.tensor(finetune_lr, dtype=torch.float64),
    }


def hand_cfg(**overrides) -> LEOConfig:
    base = dict(num_classes=2, num_shots=1, num_queries=1, latent_dim=2, dropout=0.0, compile=False)
    return make_config("default", **{**base, **overrides})


X_HAND = torch.eye(2, dtype=torch.float64)[:, None, :]  # x_0 = e_0 (class 0), x_1 = e_1
SIGMA = math.e / (1.0 + math.e)  # softmax([1, 0])[0]


def softmax2(a: float, b: float) -> float:
    """softmax([a, b])[0]."""
    return 1.0 / (1.0 + math.exp(b - a))


def hand_weight_grad(w: torch.Tensor) -> torch.Tensor:
    """Summed support CE gradient for x_n = e_n, K=1: dL/dw_c = sum_m (p_mc - y_mc) e_m."""
    w0, w1 = w[0, 0], w[1, 0]
    p00 = softmax2(w0[0].item(), w1[0].item())  # example 0 (x = e_0) in class 0
    p10 = softmax2(w0[1].item(), w1[1].item())  # example 1 (x = e_1) in class 0
    g0 = torch.tensor([p00 - 1.0, p10], dtype=torch.float64)
    g1 = torch.tensor([1.0 - p00, (1.0 - p10) - 1.0], dtype=torch.float64)
    return torch.stack([g0, g1])[:, None, :]


@pytest.mark.parametrize("form", FORMS)
def test_hand_derived_latent_distribution_kl_and_first_sampled_step(form):
    cfg = hand_cfg(form=form, inner_steps=1, finetune_steps=0)
    params = hand_params()
    z_eps = torch.tensor([[[0.3, -1.2]], [[0.8, 0.1]]], dtype=torch.float64)
    w_eps = torch.tensor(
        [[[[0.5, -0.4]], [[-1.0, 0.2]]], [[[0.1, 0.9]], [[0.7, -0.6]]]], dtype=torch.float64
    )
    noise = {"z_eps": z_eps, "w_eps": w_eps}
    out = adapt(params, X_HAND, cfg, training=True, noise=noise)

    mu = X_HAND  # identity encoder, class averages of the codes
    z0 = mu + 0.5 * z_eps  # std = exp(A/2) - 1 = 0.5
    assert close(out["z_init"], z0)
    kl = (-0.5 * z_eps**2 - math.log(0.5) + 0.5 * z0**2).mean()  # log q - log p at z0
    assert abs(out["kl"].item() - kl.item()) < 1e-12

    offset = math.sqrt(2.0 / (2 + 2))  # decoder raw part is 0: std = exp(0) - 1 + offset
    w_first = z0 + offset * w_eps[0]  # decode 0 uses weight sample 0
    z1 = z0 - params["inner_lr"] * hand_weight_grad(w_first)
    assert close(out["z_adapted"], z1)
    w_final = z1 + offset * w_eps[1]  # the final decode uses weight sample 1
    assert close(out["w_bar"], w_final[:, 0])
    assert abs(out["encoder_penalty"].item() - ((z1 - z0) ** 2).mean().item()) < 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_hand_derived_evaluation_step_and_finetuning_step(form):
    params = hand_params()
    g = (1.0 - SIGMA) * torch.tensor([[[-1.0, 1.0]], [[1.0, -1.0]]], dtype=torch.float64)
    assert close(hand_weight_grad(X_HAND.clone()), g)

    # One latent step at evaluation: z = mu = x, w = z; z' = z - alpha * g.
    out = adapt(
        params, X_HAND, hand_cfg(form=form, inner_steps=1, finetune_steps=0), training=False
    )
    want = X_HAND - params["inner_lr"] * g
    assert close(out["z_adapted"], want)
    assert close(out["w_bar"], want[:, 0])
    assert out["kl"].item() == 0.0 and out["encoder_penalty"].item() == 0.0

    # One fine-tuning step: w' = w - finetune_lr * g (per embedding dimension).
    out = adapt(
        params, X_HAND, hand_cfg(form=form, inner_steps=0, finetune_steps=1), training=False
    )
    assert close(out["w_bar"], (X_HAND - params["finetune_lr"] * g)[:, 0])


def test_hand_derived_query_loss_and_regularisers():
    params = hand_params()
    cfg = hand_cfg(deterministic=True, inner_steps=0, finetune_steps=0)
    q, kl, pen, acc = episode_loss(params, X_HAND, X_HAND, cfg, {})
    assert abs(q.item() - math.log(1.0 + math.exp(-1.0))) < 1e-12  # logits [1, 0] and [0, 1]
    assert acc.item() == 1.0 and kl.item() == 0.0 and pen.item() == 0.0
    # L2 = (2 + 4 + 4 + (2 + 2 A^2) + 2) / 2 over the network weights only.
    assert abs(l2_penalty(params).item() - (14.0 + 2.0 * A**2) / 2.0) < 1e-12
    assert orthogonality_penalty(params).item() < 1e-24  # orthonormal decoder rows
    skew = {**params, "decoder.0": torch.tensor([[1.0, 0, 0, 0], [1, 1, 0, 0]]).double()}
    # C = [[1, 1/sqrt2], [1/sqrt2, 1]]: mean((C - I)^2) = 2 * (1/2) / 4.
    assert abs(orthogonality_penalty(skew).item() - 0.25) < 1e-12
    assert abs(orthogonality(skew["decoder.0"]).item() - 0.25) < 1e-12
    meta = meta_loss(params, q, kl, pen, cfg)
    want = q + cfg.l2_penalty_weight * (14.0 + 2.0 * A**2) / 2.0
    assert abs(meta.item() - want.item()) < 1e-12


def test_hand_derived_std_and_decoder_offset():
    raw = torch.log(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64))
    assert close(
        gaussian_std(raw, 0.0), torch.tensor([1e-10, 1e-10, 1.0, 2.0], dtype=torch.float64)
    )
    assert close(gaussian_std(raw, 0.3), torch.tensor([1e-10, 0.3, 1.3, 2.3], dtype=torch.float64))
    assert abs(decoder_std_offset(5, 640) - math.sqrt(2.0 / 645.0)) < 1e-15


# ----------------------------------------------------------------------------- pieces
def test_float_masks_equal_the_comparisons_they_replace():
    """positive/relu/gaussian_std_parts (float masks, for the compiled CPU path) against
    the comparison, F.relu and the clamp: values and gradients, at and around the kinks."""
    tiny = torch.finfo(torch.float32).tiny
    x = torch.tensor(
        [-3.0, -1.0, -1e-30, -tiny, 0.0, -0.0, tiny, 1e-30, 0.5, 1.0, 1.5, 1e30], requires_grad=True
    )
    assert torch.equal(positive(x), (x > 0).float())
    assert not positive(x).requires_grad
    v = torch.linspace(0.5, 2.0, len(x))
    (g_ref,) = torch.autograd.grad((F.relu(x) * v).sum(), x)
    y = x * positive(x)  # what relu computes under torch.compile
    assert torch.equal(y, F.relu(x))
    (g,) = torch.autograd.grad((y * v).sum(), x)
    assert torch.equal(g, g_ref)  # 0 at 0, like F.relu
    compiled_relu = torch.compile(relu, backend="aot_eager")  # traced: the float-mask branch
    y = compiled_relu(x)
    assert torch.equal(y, F.relu(x))
    (g,) = torch.autograd.grad((y * v).sum(), x)
    assert torch.equal(g, g_ref)

    offset = 0.3
    floor = torch.tensor(1e-10, dtype=torch.float32)
    # exp(raw) - (1 - offset) below, at, just above and well above the 1e-10 floor
    t_target = torch.tensor([-0.5, 0.0, 1e-10, 2e-10, 1e-3, 2.0])
    raw = torch.log(t_target + (1.0 - offset)).requires_grad_()
    std, e, kept = gaussian_std_parts(raw, offset)
    ref = gaussian_std(raw, offset)
    assert torch.equal(std, ref)
    assert torch.equal(e, torch.exp(raw))
    assert torch.equal(kept, ((torch.exp(raw) - (1.0 - offset)) >= floor).float())
    (g,) = torch.autograd.grad((std * v[:6]).sum(), raw)
    (g_ref,) = torch.autograd.grad((ref * v[:6]).sum(), raw)
    assert torch.equal(g, g_ref)
    assert kept[0] == 0 and kept[-1] == 1


def test_relation_fast_equals_literal_equals_explicit_pair_loop():
    gen = torch.Generator().manual_seed(7)
    cfg = small_cfg(latent_dim=5)
    params = {k: v.double() for k, v in init_params(cfg, D, gen).items()}
    codes = torch.randn(4, 3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    lit, fast = relation_literal(params, codes), relation_fast(params, codes)
    assert lit.shape == (4, 10)
    flat = codes.reshape(12, 5)
    pairs = torch.stack(
        [
            torch.stack([mlp_on_vector(params, "relation", torch.cat([a, b])) for b in flat]).mean(
                0
            )
            for a in flat
        ]
    )
    loop = pairs.reshape(4, 3, 10).mean(dim=1)
    assert rel_err(lit, loop) < 1e-12 and rel_err(fast, loop) < 1e-12
    v = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    (g_lit,) = torch.autograd.grad((lit * v).sum(), codes)
    (g_fast,) = torch.autograd.grad((fast * v).sum(), codes)
    assert rel_err(g_fast, g_lit) < 1e-12


def test_support_grad_wbar_equals_autograd_of_the_summed_loss():
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 7, generator=gen, dtype=torch.float64)
    w_bar = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    (g_model,) = torch.autograd.grad(support_loss(x, w_bar), w_bar)
    (g_plain,) = torch.autograd.grad(summed_support_loss(x, w_bar[:, None, :]), w_bar)
    assert rel_err(support_grad_wbar(x, w_bar), g_plain) < 1e-12
    assert rel_err(g_model, g_plain) < 1e-12


def test_init_params_is_glorot_uniform_with_constant_step_sizes():
    cfg = make_config("default", latent_dim=16, hidden_dim=None)
    params = init_params(cfg, 48, torch.Generator().manual_seed(15))
    shapes = {
        "encoder.0": (48, 16),
        "relation.0": (32, 32),
        "relation.1": (32, 32),
        "relation.2": (32, 32),
        "decoder.0": (16, 96),
        "inner_lr": (16,),
        "finetune_lr": (48,),
    }
    assert {k: tuple(v.shape) for k, v in params.items()} == shapes
    assert all(v.dtype == torch.float32 for v in params.values())
    for name, (fan_in, fan_out) in ((k, v) for k, v in shapes.items() if len(v) == 2):
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        w = params[name]
        assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit, name
        assert abs(w.var().item() / (limit**2 / 3.0) - 1.0) < 0.15, name  # U(-l, l) variance
    assert torch.equal(params["inner_lr"], torch.ones(16))
    assert torch.equal(params["finetune_lr"], torch.full((48,), 1e-3))


# ----------------------------------------------------------------------------- behaviour
def test_evaluation_is_deterministic_training_follows_the_noise():
    cfg = small_cfg()
    params, xs, _, noise = make_episode(cfg)
    a = adapt(params, xs, cfg, training=False)
    b = adapt(params, xs, cfg, training=False)
    assert torch.equal(a["w_bar"], b["w_bar"])
    assert a["kl"].item() == 0.0 and a["encoder_penalty"].item() == 0.0
    same1 = adapt(params, xs, cfg, training=True, noise=noise)
    same2 = adapt(params, xs, cfg, training=True, noise=noise)
    assert torch.equal(same1["w_bar"], same2["w_bar"])
    _, _, _, other = make_episode(cfg, seed=9)
    diff = adapt(params, xs, cfg, training=True, noise=other)
    assert rel_err(diff["w_bar"], same1["w_bar"]) > 1e-3
    torch.manual_seed(0)
    r1 = adapt(params, xs, cfg, training=True)
    r2 = adapt(params, xs, cfg, training=True)  # in-graph draws: a new sample each call
    assert rel_err(r1["w_bar"], r2["w_bar"]) > 1e-3
    assert r1["kl"].item() != 0.0 and r1["encoder_penalty"].item() > 0.0


@pytest.mark.parametrize("form", FORMS)
def test_finetuning_and_small_latent_steps_lower_the_support_loss(form):
    cfg = small_cfg(form=form)
    params, xs, _, _ = make_episode(cfg)
    params = {k: v.detach() for k, v in params.items()}
    params["finetune_lr"] = torch.full((D,), 0.5, dtype=torch.float64)
    params["inner_lr"] = torch.full((Z,), 0.1, dtype=torch.float64)
    losses = []
    for steps in range(6):
        c = dataclasses.replace(cfg, eval_inner_steps=0, eval_finetune_steps=steps)
        losses.append(support_loss(xs, adapt(params, xs, c, training=False)["w_bar"]).item())
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False)), losses
    leo = []
    for steps in range(4):
        c = dataclasses.replace(cfg, eval_inner_steps=steps, eval_finetune_steps=0)
        leo.append(support_loss(xs, adapt(params, xs, c, training=False)["w_bar"]).item())
    assert all(b < a for a, b in zip(leo, leo[1:], strict=False)), leo


def test_two_layer_variant_forms_agree_match_plain_and_finite_differences():
    cfg = small_cfg(hidden_dim=5, form="fast")
    params, xs, xq, noise = make_episode(cfg, seed=10)
    assert params["encoder.1"].shape == (5, Z) and params["decoder.1"].shape == (5, 2 * D)
    fast = model_loss(params, xs, xq, cfg, noise)
    lit = model_loss(params, xs, xq, dataclasses.replace(cfg, form="literal"), noise)
    ref = plain_episode(params, xs, xq, cfg, noise)["meta_loss"]
    assert abs(fast.item() - lit.item()) < TOL and abs(fast.item() - ref.item()) < TOL
    g_fast = grads(fast, params)
    assert_grads_agree(g_fast, grads(lit, params))
    assert_grads_agree(g_fast, grads(ref, params))
    cfg = dataclasses.replace(cfg, encoder_penalty_weight=0.0)  # no stop-gradient for FD
    g_fd = grads(model_loss(params, xs, xq, cfg, noise), params)
    gen, h = torch.Generator().manual_seed(11), 1e-5
    for name in params:
        v = torch.randn(params[name].shape, generator=gen, dtype=torch.float64)
        up = loss_value(perturbed(params, name, h * v), xs, xq, cfg, noise)
        down = loss_value(perturbed(params, name, -h * v), xs, xq, cfg, noise)
        fd = (up - down) / (2 * h)
        assert abs((g_fd[name] * v).sum().item() - fd) < 1e-6 * max(1.0, abs(fd)), name


@pytest.mark.parametrize("form", FORMS)
def test_random_prior_ablation(form):
    cfg = small_cfg(form=form, random_prior=True)
    params, xs, xq, noise = make_episode(cfg)
    assert "enc_keep" not in noise
    out = adapt(params, xs, cfg, training=True, noise=noise)
    assert torch.equal(out["z_init"], noise["z_eps"])  # z ~ N(0, I), not the encoder
    assert out["kl"].item() == 0.0 and out["encoder_penalty"].item() == 0.0
    loss = model_loss(params, xs, xq, cfg, noise)
    ref = plain_episode(params, xs, xq, cfg, noise)
    assert abs(loss.item() - ref["meta_loss"].item()) < TOL
    g = grads(loss, params)
    assert_grads_agree(g, grads(ref["meta_loss"], params))
    for name in ("encoder.0", "relation.0", "relation.1", "relation.2"):  # only L2 reaches them
        assert close(g[name], cfg.l2_penalty_weight * params[name], 1e-15)
    ev = adapt(params, xs, cfg, training=False)
    assert torch.equal(ev["z_init"], torch.zeros(N, K, Z, dtype=torch.float64))  # prior mean


@pytest.mark.parametrize("form", FORMS)
def test_deterministic_ablation_ignores_gaussian_noise(form):
    cfg = small_cfg(form=form, deterministic=True, dropout=0.0)
    params, xs, xq, _ = make_episode(cfg)
    gen = torch.Generator().manual_seed(12)
    fake = {
        "z_eps": torch.randn(N, K, Z, generator=gen, dtype=torch.float64),
        "w_eps": torch.randn(cfg.inner_steps + 1, N, K, D, generator=gen, dtype=torch.float64),
    }
    a = adapt(params, xs, cfg, training=True, noise=fake)
    b = adapt(params, xs, cfg, training=True, noise={})
    ev = adapt(params, xs, cfg, training=False)
    assert torch.equal(a["w_bar"], b["w_bar"]) and a["kl"].item() == 0.0
    assert rel_err(a["w_bar"], ev["w_bar"]) < 1e-12  # train = test without dropout
    assert torch.equal(a["z_init"], ev["z_init"])  # the mean
    assert a["encoder_penalty"].item() > 0.0  # the penalty is still a training term
