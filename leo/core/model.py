"""The LEO model as pure functions over named parameters (one episode; vmap adds the batch).

Read beside ``docs/model.md``: the numbered comments are its points 1-11, and its section
"The fast form" shows why each rewrite of ``form="fast"`` is exact.
Shapes: N classes, K shots, Q queries per class, D embedding dim, Z latent dim.

Parameters (``dict[str, Tensor]``, every weight stored (in, out) so a layer is ``x @ W``):

=================  ==============  =====================================================
name               shape           role
=================  ==============  =====================================================
``encoder.0``      (D, Z)|(D, H)   encoder g_phi_e (``encoder.1`` (H, Z) if hidden_dim=H)
``relation.0..2``  (2Z, 2Z)        relation network, 3 layers, ReLU between, no biases
``decoder.0``      (Z, 2D)|(Z, H)  decoder g_phi_d (``decoder.1`` (H, 2D) if hidden_dim=H)
``inner_lr``       (Z,)            alpha: learnable per-latent LEO step size (init 1.0)
``finetune_lr``    (D,)            learnable per-dimension fine-tuning step size (1e-3)
=================  ==============  =====================================================

Randomness is explicit: every function that samples takes ``noise``, a dict of pre-drawn
tensors (see :mod:`leo.core.noise`), or ``None`` to draw in-graph with ``torch.rand``/``randn``
(the fast compiled path; under ``vmap(randomness="different")`` each episode differs).

Two forms of the same math (``cfg.form``):

- ``"literal"``: the reference code transcribed: the relation MLP on all (NK)^2 pairs, the
  logits of every weight sample averaged over k, inner gradients by ``torch.func.grad``;
- ``"fast"``: identical values by algebra: the first relation layer factored over the pair
  halves and the linear last layer moved past the averages; logits through the mean weight
  ``w_bar = mean_k w`` (the logit is linear in w); support-loss gradients in closed form
  (softmax minus one-hot). Tests check the two agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from leo.core.config import LEOConfig

Params = dict[str, Tensor]
Noise = dict[str, Tensor] | None
STEP_SIZE_NAMES = ("inner_lr", "finetune_lr")


# ----------------------------------------------------------------------------- parameters
def init_params(
    cfg: LEOConfig, dim: int, generator: torch.Generator | None = None, device=None
) -> Params:
    """Glorot-uniform weights and constant step sizes, as the reference code initialises them.

    Args:
        cfg: the config (latent_dim, hidden_dim, step-size inits).
        dim: D, the embedding dimension.
        generator: seeded CPU generator for the weights.
        device: where to put the parameters.
    """
    z, h = cfg.latent_dim, cfg.hidden_dim
    shapes = {}
    shapes.update(
        {"encoder.0": (dim, z)} if h is None else {"encoder.0": (dim, h), "encoder.1": (h, z)}
    )
    shapes.update({f"relation.{i}": (2 * z, 2 * z) for i in range(3)})
    shapes.update(
        {"decoder.0": (z, 2 * dim)}
        if h is None
        else {"decoder.0": (z, h), "decoder.1": (h, 2 * dim)}
    )
    params: Params = {}
    for name, (fan_in, fan_out) in shapes.items():
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        w = torch.rand(fan_in, fan_out, generator=generator) * (2 * limit) - limit
        params[name] = w
    params["inner_lr"] = torch.full((z,), cfg.inner_lr_init)
    params["finetune_lr"] = torch.full((dim,), cfg.finetune_lr_init)
    return {k: v.to(device=device, dtype=torch.float32) for k, v in params.items()}


def weight_names(params: Params, prefix: str) -> list[str]:
    """Names of the layers of one network (``encoder``, ``relation``, ``decoder``), in order."""
    return sorted(
        (k for k in params if k.startswith(prefix + ".")), key=lambda k: int(k.split(".")[1])
    )


def _mlp(params: Params, prefix: str, x: Tensor) -> Tensor:
    """Bias-free MLP: ReLU between layers, none after the last."""
    names = weight_names(params, prefix)
    for i, name in enumerate(names):
        x = x @ params[name]
        if i < len(names) - 1:
            x = F.relu(x)
    return x


# ----------------------------------------------------------------------------- randomness
def _keep_mask(noise: Noise, key: str, index: int | None, shape, rate: float, ref: Tensor):
    """Dropout keep-mask scaled by 1/(1-rate) (tf.nn.dropout: keep where uniform >= rate)."""
    if rate == 0.0:
        return None
    if noise is not None:
        return noise[key] if index is None else noise[key][index]
    u = torch.rand(shape, dtype=ref.dtype, device=ref.device)
    return (u >= rate).to(ref.dtype) / (1.0 - rate)


def _normal(noise: Noise, key: str, index: int | None, shape, ref: Tensor) -> Tensor:
    if noise is not None:
        return noise[key] if index is None else noise[key][index]
    return torch.randn(shape, dtype=ref.dtype, device=ref.device)


def _dropout(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x * mask


# Compiled on CPU, a comparison whose result the backward needs (ReLU, clamp) is saved as
# a boolean mask, and the generated code stores booleans ~60x slower than floats (9 ms
# against 0.15 ms for the 5-shot relation network's 960k activations; bench/kernels.py).
# The fast form therefore writes its masks as floats: [x > 0] = ceil(clamp(x, 0, 1)),
# exact for every float x (a difference a - b of floats is 0 only when a = b).
def positive(x: Tensor) -> Tensor:
    """[x > 0] as a float tensor (1.0 or 0.0), without a comparison; no gradient."""
    return torch.ceil(x.detach().clamp(0.0, 1.0))


def relu(x: Tensor) -> Tensor:
    """max(x, 0); under torch.compile as x * [x > 0] with a float mask: ``F.relu``'s values
    for finite x (-0.0 = 0 for negative x) and its gradient [x > 0] (0 at 0). Eager, where
    the extra passes cost more than the boolean, ``F.relu`` itself."""
    if torch.compiler.is_compiling():
        return x * positive(x)
    return F.relu(x)


# ----------------------------------------------------------------------------- 1-4: codes
def encode(params: Params, x: Tensor) -> Tensor:
    """1. Encoder (after dropout): (N, K, D) -> (N, K, Z)."""
    return _mlp(params, "encoder", x)


def relation_literal(params: Params, codes: Tensor) -> Tensor:
    """2. Relation network, literally: every ordered pair, average over j, then over K.

    Args:
        codes: (N, K, Z).
    Returns:
        (N, 2Z): per-class distribution parameters (broadcast over K by the caller).
    """
    n, k, z = codes.shape
    flat = codes.reshape(n * k, z)
    left = flat[:, None, :].expand(n * k, n * k, z)
    right = flat[None, :, :].expand(n * k, n * k, z)
    out = _mlp(params, "relation", torch.cat([left, right], dim=-1))  # (NK, NK, 2Z)
    return out.mean(dim=1).reshape(n, k, 2 * z).mean(dim=1)


def relation_fast(params: Params, codes: Tensor) -> Tensor:
    """2. Relation network, factored: identical to :func:`relation_literal`.

    [c_i, c_j] @ W0 = c_i @ W0[:Z] + c_j @ W0[Z:], and the last layer is linear, so it
    commutes with the averages over j and over K.
    """
    n, k, z = codes.shape
    w0, w1, w2 = (params[f"relation.{i}"] for i in range(3))
    flat = codes.reshape(n * k, z)
    h = relu((flat @ w0[:z])[:, None, :] + (flat @ w0[z:])[None, :, :])  # (NK, NK, 2Z)
    h = relu(h @ w1)
    return (h.mean(dim=1).reshape(n, k, 2 * z).mean(dim=1)) @ w2


STD_FLOOR = 1e-10


def shifted_expm1(raw: Tensor, offset: float) -> tuple[Tensor, Tensor]:
    """3. (t, exp(raw)) with t = expm1(raw) + offset = exp(raw) - (1 - offset), the std before
    its clamp, accurate to float32's precision wherever the std is not itself near 0.

    With offset 0 (the latents), exp(raw) - 1 cancels catastrophically near raw = 0: exp(raw)
    is rounded to a spacing of 1.2e-7 around 1, then 1 is subtracted, so a std of 1e-4 keeps
    three digits, and the KL's log(std) and its slope 1/std inherit the error. ``torch.expm1``
    computes it without the cancellation. With the decoder's offset sqrt(2 / (N + D)) > 0 the
    std near raw = 0 is about the offset, not about 0, and exp(raw) - (1 - offset) is already
    accurate: measured against float64, at most 1.4e-6 relative from raw = 0 up, against
    expm1's 1.1e-7 (docs/findings.md, section 4). There the subtraction is kept, because
    ``torch.expm1`` is not vectorised on a CPU (13x the time of ``torch.exp`` on a 5-shot
    batch's weights here, which made a 5-shot step 30% slower); the latents' tensors are
    small. Every path (:func:`gaussian_std`, :func:`gaussian_std_parts`,
    :func:`leo.core.explicit._std_and_slope`) goes through here.
    """
    e = torch.exp(raw)
    t = torch.expm1(raw) if offset == 0.0 else e - (1.0 - offset)
    return t, e


def gaussian_std(raw: Tensor, offset: float) -> Tensor:
    """3. std = exp(raw) - (1 - offset), clamped below at 1e-10 (:func:`shifted_expm1`)."""
    return torch.clamp(shifted_expm1(raw, offset)[0], min=STD_FLOOR)


def gaussian_std_parts(raw: Tensor, offset: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gaussian_std` with float masks: (std, exp(raw), kept), kept = [t >= 1e-10].

    t = expm1(raw) + offset; std = t * kept + 1e-10 * (1 - kept) equals the clamp, and
    its gradient, kept * exp(raw) per unit of raw, is the clamp's (which passes gradient
    where t >= 1e-10). ``exp(raw)`` and ``kept`` are returned for the closed-form gradient.
    """
    t, e = shifted_expm1(raw, offset)
    kept = 1.0 - positive(STD_FLOOR - t)
    return t * kept + STD_FLOOR * (1.0 - kept), e, kept


def kl_at_sample(z: Tensor, std: Tensor, eps: Tensor) -> Tensor:
    """3. KL(q || N(0, I)) estimated at the sample: mean of log q(z) - log p(z).

    With z = mu + std * eps, (z - mu) / std = eps, and the log(2 pi) terms cancel.
    """
    return (-0.5 * eps.square() - torch.log(std) + 0.5 * z.square()).mean()


def decoder_std_offset(num_classes: int, dim: int) -> float:
    """4. Offset of the decoder's std: sqrt(2 / (N + D)) (Glorot scale)."""
    return math.sqrt(2.0 / (num_classes + dim))


def decode(params: Params, z: Tensor) -> tuple[Tensor, Tensor]:
    """4. Decoder: (N, K, Z) -> mean and raw scale of the weights, each (N, K, D)."""
    out = _mlp(params, "decoder", z)
    return out.chunk(2, dim=-1)


# ----------------------------------------------------------------------------- 5: logits
def logits_literal(x: Tensor, w: Tensor) -> Tensor:
    """5. logit[x, n] = mean over k of x . w[n, k]; x (M, D), w (N, K, D) -> (M, N)."""
    return torch.einsum("md,nkd->mnk", x, w).mean(dim=-1)


def support_loss(x: Tensor, w_bar: Tensor) -> Tensor:
    """6. Summed softmax cross-entropy of the support set; x (N, K, D), w_bar (N, D)."""
    n, k, d = x.shape
    logits = x.reshape(n * k, d) @ w_bar.T
    labels = torch.arange(n, device=x.device).repeat_interleave(k)
    return F.cross_entropy(logits, labels, reduction="sum")


def support_grad_wbar(x: Tensor, w_bar: Tensor) -> Tensor:
    """Closed-form d(support_loss)/d(w_bar) = (softmax - onehot)^T x; (N, D)."""
    n, k, d = x.shape
    flat = x.reshape(n * k, d)
    # (w_bar @ x^T)^T rather than x @ w_bar^T, and p^T @ x rather than an einsum: the same
    # sums, laid out so that gradients with respect to w_bar come out (N, D)-contiguous,
    # which the compiled CPU backward reduces several times faster.
    p = torch.softmax((w_bar @ flat.T).T, dim=-1).reshape(n, k, n)
    p = p - torch.eye(n, dtype=x.dtype, device=x.device)[:, None, :]
    return p.reshape(n * k, n).T @ flat


# ----------------------------------------------------------------------------- 6, 8: loops
def _decode_sample(params, z, eps, offset, stochastic):
    mu, raw = decode(params, z)
    if not stochastic:
        return mu, None
    return mu + gaussian_std(raw, offset) * eps, raw


def _decode_wbar_linear(params, z, eps, offset, stochastic):
    """Linear decoder, fast: w_bar = mean_k(z) @ W_mu + mean_k(std * eps); (N, D).

    The mean half is linear, so it is decoded once per class (N rows, not N*K); only the
    scale half, which goes through exp, needs every k. Also returns (exp(raw), kept) of
    :func:`gaussian_std_parts` for :func:`_scale_grad` (None when deterministic).
    """
    d = params["decoder.0"].shape[1] // 2
    w_mu, w_raw = params["decoder.0"][:, :d], params["decoder.0"][:, d:]
    w_bar = z.mean(dim=1) @ w_mu
    if not stochastic:
        return w_bar, None
    std, e, kept = gaussian_std_parts(z @ w_raw, offset)  # (N, K, D)
    return w_bar + (std * eps).mean(dim=1), (e, kept)


def _scale_grad(g_w, parts, eps):
    """d/d(raw) of w = mu + std(raw) * eps, given dL/dw and (exp(raw), kept); the clamp
    passes no gradient where it is active."""
    e, kept = parts
    return g_w * eps * e * kept


def _latent_grad_fast(params, z, x, eps, offset, stochastic):
    """d(support_loss)/dz in closed form, through the (linear or ReLU) decoder.

    dL/dw[n, k] = dL/dw_bar[n] / K for every k, so for a linear decoder the mean half's
    contribution ``(dL/dw_bar / K) @ W_mu^T`` is computed once per class.
    """
    k = z.shape[1]
    names = weight_names(params, "decoder")
    if len(names) == 1:
        d = params["decoder.0"].shape[1] // 2
        w_bar, parts = _decode_wbar_linear(params, z, eps, offset, stochastic)
        g_bar = support_grad_wbar(x, w_bar) / k  # (N, D)
        g = (g_bar @ params["decoder.0"][:, :d].T)[:, None, :]
        if stochastic:
            g_raw = _scale_grad(g_bar[:, None, :], parts, eps)
            g = g + g_raw @ params["decoder.0"][:, d:].T
        return g.expand_as(z), w_bar
    hidden = [z]
    for name in names[:-1]:
        hidden.append(relu(hidden[-1] @ params[name]))
    mu, raw = (hidden[-1] @ params[names[-1]]).chunk(2, dim=-1)
    if stochastic:
        std, *parts = gaussian_std_parts(raw, offset)
        w = mu + std * eps
    else:
        w = mu
    g_w = (support_grad_wbar(x, w.mean(dim=1)) / k)[:, None, :].expand_as(w)  # (N, K, D)
    g_raw = _scale_grad(g_w, parts, eps) if stochastic else torch.zeros_like(g_w)
    g = torch.cat([g_w, g_raw], dim=-1)
    for i in range(len(names) - 1, -1, -1):
        g = g @ params[names[i]].T
        if i > 0:
            g = g * positive(hidden[i])
    return g, w.mean(dim=1)


def _literal_loss_of_z(z, params, x, eps, offset, stochastic):
    w, _ = _decode_sample(params, z, eps, offset, stochastic)
    n, k, d = x.shape
    logits = logits_literal(x.reshape(n * k, d), w)
    labels = torch.arange(n, device=x.device).repeat_interleave(k)
    return F.cross_entropy(logits, labels, reduction="sum"), w


def _literal_loss_of_w(w, x):
    n, k, d = x.shape
    logits = logits_literal(x.reshape(n * k, d), w)
    labels = torch.arange(n, device=x.device).repeat_interleave(k)
    return F.cross_entropy(logits, labels, reduction="sum")


def adapt(
    params: Params,
    x_support: Tensor,
    cfg: LEOConfig,
    *,
    training: bool,
    noise: Noise = None,
    sample: bool = False,
) -> dict[str, Tensor]:
    """Points 1-8 for one episode: encode, LEO inner loop, fine-tuning.

    Args:
        params: named parameters.
        x_support: (N, K, D) support embeddings; row n is class n.
        cfg: the config (form, ablations, step counts, dropout).
        training: meta-training (dropout, sampling, KL, penalty) or evaluation (means).
        noise: pre-drawn noise (:func:`leo.core.noise.draw_noise`) or None to draw in-graph.
        sample: at evaluation, sample the latents and weights instead of taking the means
            (test-time ensembles; no dropout, no KL). Ignored in training, which samples.

    Returns:
        dict with ``w_bar`` (N, D) final classifier (mean over k of the adapted weights),
        ``z_init`` and ``z_adapted`` (N, K, Z), ``kl`` and ``encoder_penalty`` scalars.
    """
    n, k, d = x_support.shape
    zdim = cfg.latent_dim
    rate = cfg.dropout if training else 0.0
    stochastic = (training or sample) and not cfg.deterministic
    steps = cfg.inner_steps if training else cfg.test_inner_steps
    ft_steps = cfg.finetune_steps if training else cfg.test_finetune_steps
    offset = decoder_std_offset(n, d)
    literal = cfg.form == "literal"
    zero = x_support.new_zeros(())

    # 1-3: latent codes z (N, K, Z) and the KL estimate.
    if cfg.random_prior:
        z = (
            _normal(noise, "z_eps", None, (n, k, zdim), x_support)
            if stochastic
            else x_support.new_zeros(n, k, zdim)
        )
        kl = zero
    else:
        x_enc = _dropout(x_support, _keep_mask(noise, "enc_keep", None, (n, k, d), rate, x_support))
        codes = encode(params, x_enc)
        stats = (relation_literal if literal else relation_fast)(params, codes)  # (N, 2Z)
        mu, raw = (s[:, None, :].expand(n, k, zdim) for s in stats.chunk(2, dim=-1))
        if stochastic:
            std = gaussian_std(raw, 0.0) if literal else gaussian_std_parts(raw, 0.0)[0]
            eps = _normal(noise, "z_eps", None, (n, k, zdim), x_support)
            z = mu + std * eps
            kl = kl_at_sample(z, std, eps) if training else zero
        else:
            z, kl = mu, zero
    z_init = z

    def mask(i):
        return _keep_mask(noise, "support_keep", i, (n, k, d), rate, x_support)

    def w_eps(i):
        return _normal(noise, "w_eps", i, (n, k, d), x_support) if stochastic else None

    # 6: LEO inner loop in latent space; loss i uses dropout mask i and weight sample i.
    for s in range(steps):
        x_s = _dropout(x_support, mask(s))
        if literal:
            g = torch.func.grad(_literal_loss_of_z, has_aux=True)(
                z, params, x_s, w_eps(s), offset, stochastic
            )[0]
        else:
            g = _latent_grad_fast(params, z, x_s, w_eps(s), offset, stochastic)[0]
        if cfg.first_order:
            g = g.detach()
        z = z - params["inner_lr"] * g
    if literal or len(weight_names(params, "decoder")) > 1:
        w, _ = _decode_sample(params, z, w_eps(steps), offset, stochastic)
    else:
        w = None  # the fast form needs only w_bar
        w_bar, _ = _decode_wbar_linear(params, z, w_eps(steps), offset, stochastic)

    # 7: encoder penalty, mean squared difference to stop_gradient(adapted z).
    penalty = (z.detach() - z_init).square().mean() if training and not cfg.random_prior else zero

    # 8: fine-tuning in parameter space; step f uses support mask steps + f.
    ft_lr = params["finetune_lr"]
    if literal:
        for f in range(ft_steps):
            g = torch.func.grad(_literal_loss_of_w)(w, _dropout(x_support, mask(steps + f)))
            w = w - ft_lr * (g.detach() if cfg.first_order else g)
        w_bar = w.mean(dim=1)
    else:
        if w is not None:
            w_bar = w.mean(dim=1)  # every k gets the same update, so adapt the mean directly
        for f in range(ft_steps):
            g = support_grad_wbar(_dropout(x_support, mask(steps + f)), w_bar) / k
            w_bar = w_bar - ft_lr * (g.detach() if cfg.first_order else g)
    return {"w_bar": w_bar, "z_init": z_init, "z_adapted": z, "kl": kl, "encoder_penalty": penalty}


# ----------------------------------------------------------------------------- 9-10: loss
def episode_loss(
    params: Params, x_support: Tensor, x_query: Tensor, cfg: LEOConfig, noise: Noise = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One meta-training episode's terms (points 1-9).

    Args:
        x_support: (N, K, D); x_query: (N, Q, D); row n of each is class n.

    Returns:
        (query_loss, kl, encoder_penalty, accuracy), scalars. The per-episode meta-loss is
        ``query_loss + beta * kl + gamma * encoder_penalty`` (:func:`meta_loss`).
    """
    n, q, d = x_query.shape
    out = adapt(params, x_support, cfg, training=True, noise=noise)
    keep = _keep_mask(noise, "query_keep", None, (n, q, d), cfg.dropout, x_query)
    xq = _dropout(x_query, keep).reshape(n * q, d)
    labels = torch.arange(n, device=x_query.device).repeat_interleave(q)
    logits = (out["w_bar"] @ xq.T).T  # = xq @ w_bar^T; see support_grad_wbar
    query_loss = F.cross_entropy(logits, labels)  # 9: mean over the query set
    accuracy = (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()
    return query_loss, out["kl"], out["encoder_penalty"], accuracy


def l2_penalty(params: Params) -> Tensor:
    """10. L2 = sum(w^2) / 2 over encoder, relation-network and decoder weights."""
    return sum(0.5 * v.square().sum() for k, v in params.items() if k not in STEP_SIZE_NAMES)


def orthogonality_penalty(params: Params) -> Tensor:
    """10. mean((C - I)^2), C = W W^T normalised by row norms, summed over decoder layers."""
    total = 0.0
    for name in weight_names(params, "decoder"):
        w = params[name]
        norms = torch.linalg.vector_norm(w, dim=1, keepdim=True) + 1e-32
        corr = (w @ w.T) / (norms @ norms.T)
        total = (
            total + (corr - torch.eye(w.shape[0], dtype=w.dtype, device=w.device)).square().mean()
        )
    return total


def meta_loss(
    params: Params, query_loss: Tensor, kl: Tensor, penalty: Tensor, cfg: LEOConfig
) -> Tensor:
    """10-11. Mean over episodes of query + beta KL + gamma penalty, plus the regularisers."""
    per_episode = query_loss + cfg.kl_weight * kl + cfg.encoder_penalty_weight * penalty
    return (
        per_episode.mean()
        + cfg.l2_penalty_weight * l2_penalty(params)
        + cfg.orthogonality_penalty_weight * orthogonality_penalty(params)
    )
