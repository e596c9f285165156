"""A plain, loop-based LEO episode written from the model's description alone: the yardstick.

Nothing here is shared with :mod:`leo.core.model`; every step is spelled out the slow way so a
reader can check it line by line against docs/model.md, points 1-10:

- the relation network runs on each of the (NK)^2 ordered pairs in an explicit double loop;
- the logits of each weight sample k are computed separately and then averaged;
- inner-loop gradients come from ``torch.autograd.grad(..., create_graph=True)`` (second
  order), the fine-tuning adapts the full (N, K, D) weights;
- the KL is the log-density difference at the sample, with (z - mu) / std recomputed from
  the sample (as ``tfp.distributions.Normal.log_prob`` does), not taken from eps.

The 2-layer variant (``encoder.1``, ``decoder.1``) runs through the same per-vector MLP
loops; its orthogonality term is summed over the decoder matrices, the convention of
:mod:`leo.core.model` (docs/model.md, point 10: the reference code has a linear decoder only).

Parameters use the names and (in, out) layout documented in :mod:`leo.core.model` (the shared
interface), noise the single-episode slice of the :func:`leo.core.noise.draw_noise` dict:
``enc_keep`` (N, K, D), ``z_eps`` (N, K, Z), ``w_eps`` (S+1, N, K, D) (sample i for the
i-th decode), ``support_keep`` (S+F, N, K, D) (mask i for the i-th support-loss evaluation:
S latent steps, then F fine-tuning steps), ``query_keep`` (N, Q, D).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)
STEP_SIZES = ("inner_lr", "finetune_lr")


def layer_names(params: dict[str, Tensor], prefix: str) -> list[str]:
    """``prefix.0``, ``prefix.1``, ... in layer order."""
    names = []
    i = 0
    while f"{prefix}.{i}" in params:
        names.append(f"{prefix}.{i}")
        i += 1
    return names


def mlp_on_vector(params: dict[str, Tensor], prefix: str, v: Tensor) -> Tensor:
    """One vector through a bias-free MLP: ReLU between layers, nothing after the last."""
    names = layer_names(params, prefix)
    for i, name in enumerate(names):
        v = v @ params[name]
        if i + 1 < len(names):
            v = torch.relu(v)
    return v


def gaussian_std(raw: Tensor, offset: float) -> Tensor:
    """Point 3: std = exp(raw) - (1 - offset), never below 1e-10."""
    return torch.clamp(torch.exp(raw) - (1.0 - offset), min=1e-10)


def normal_log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Elementwise log N(x; mean, std^2), TFP style: from the standardised (x - mean) / std."""
    u = (x - mean) / std
    return -0.5 * u * u - torch.log(std) - 0.5 * LOG_2PI


def averaged_logits(x: Tensor, w: Tensor) -> Tensor:
    """Point 5: logits of rows x (M, D) under weights w (N, K, D): mean over k of x . w[n, k]."""
    num_shots = w.shape[1]
    total = None
    for k in range(num_shots):
        logits_k = x @ w[:, k, :].T  # (M, N): the logits of weight sample k alone
        total = logits_k if total is None else total + logits_k
    return total / num_shots


def cross_entropies(logits: Tensor, labels: list[int]) -> list[Tensor]:
    """-log softmax(logits[m])[labels[m]] for every row m."""
    return [torch.logsumexp(logits[m], dim=0) - logits[m, c] for m, c in enumerate(labels)]


def summed_support_loss(x: Tensor, w: Tensor) -> Tensor:
    """Point 6: SUM of cross-entropies over the support set x (N, K, D) (row n is class n)."""
    n, k, d = x.shape
    labels = [c for c in range(n) for _ in range(k)]
    return torch.stack(cross_entropies(averaged_logits(x.reshape(n * k, d), w), labels)).sum()


def orthogonality(w: Tensor) -> Tensor:
    """Point 10: mean over (i, j) of (cos(w_i, w_j) - delta_ij)^2 over the rows of w."""
    rows = w.shape[0]
    terms = []
    for i in range(rows):
        for j in range(rows):
            c = torch.dot(w[i], w[j]) / (torch.linalg.norm(w[i]) * torch.linalg.norm(w[j]))
            terms.append((c - (1.0 if i == j else 0.0)) ** 2)
    return torch.stack(terms).sum() / (rows * rows)


def l2_sum(params: dict[str, Tensor]) -> Tensor:
    """Point 10: sum(w^2) / 2 over every network weight (not the step sizes)."""
    return sum(0.5 * (v * v).sum() for name, v in params.items() if name not in STEP_SIZES)


def _needs_grad(t: Tensor) -> Tensor:
    return t if t.requires_grad else t.detach().requires_grad_(True)


def plain_episode(
    params: dict[str, Tensor],
    x_support: Tensor,
    x_query: Tensor,
    cfg,
    noise: dict[str, Tensor] | None,
    *,
    training: bool = True,
) -> dict[str, Tensor]:
    """One episode of LEO, every term of its meta-loss (docs/model.md, points 1-10).

    Args:
        params: named weights, (in, out) layout; ``inner_lr`` (Z,), ``finetune_lr`` (D,).
        x_support: (N, K, D), row n is class n; x_query: (N, Q, D).
        cfg: a ``LEOConfig`` (only its plain fields are read: dropout, ablations, step
            counts, loss weights, first_order).
        noise: single-episode noise dict (module docstring); may be None when nothing is
            random (evaluation, or deterministic with no dropout).
        training: meta-training (dropout, sampling, KL, encoder penalty) or evaluation.

    Returns:
        dict with ``meta_loss``, ``query_loss``, ``kl``, ``encoder_penalty``, ``l2``,
        ``orthogonality`` (scalars), ``z_init``, ``z_adapted`` (N, K, Z), ``w`` (N, K, D)
        after fine-tuning, and ``support_losses`` (the summed support loss at each
        evaluation, LEO steps then fine-tuning steps, then the final weights).
    """
    with torch.enable_grad():
        return _plain_episode(params, x_support, x_query, cfg, noise or {}, training)


def _plain_episode(params, x_support, x_query, cfg, noise, training):
    n, k, d = x_support.shape
    q = x_query.shape[1]
    zdim = params["inner_lr"].shape[0]
    rate = cfg.dropout if training else 0.0
    sample = training and not cfg.deterministic
    latent_steps = cfg.inner_steps if training else cfg.test_inner_steps
    ft_steps = cfg.finetune_steps if training else cfg.test_finetune_steps
    create_graph = not cfg.first_order
    zero = x_support.new_zeros(())

    def masked(x, key, index=None):
        if rate == 0.0:
            return x
        mask = noise[key] if index is None else noise[key][index]
        return x * mask

    # Points 1-3: latent codes.
    if cfg.random_prior:
        z = noise["z_eps"].clone() if sample else x_support.new_zeros(n, k, zdim)
        kl = zero
    else:
        x_enc = masked(x_support, "enc_keep")
        codes = [mlp_on_vector(params, "encoder", x_enc[c, s]) for c in range(n) for s in range(k)]
        pair_means = []
        for i in range(n * k):
            acc = None
            for j in range(n * k):
                out = mlp_on_vector(params, "relation", torch.cat([codes[i], codes[j]]))
                acc = out if acc is None else acc + out
            pair_means.append(acc / (n * k))
        z_rows, kl_terms = [], []
        for c in range(n):
            stats = sum(pair_means[c * k + s] for s in range(k)) / k  # average over the K shots
            mu, raw = stats[:zdim], stats[zdim:]
            for s in range(k):
                if sample:
                    std = gaussian_std(raw, 0.0)
                    zs = mu + std * noise["z_eps"][c, s]
                    zero_mean = torch.zeros_like(zs)
                    one = torch.ones_like(zs)
                    kl_terms.append(
                        normal_log_prob(zs, mu, std) - normal_log_prob(zs, zero_mean, one)
                    )
                    z_rows.append(zs)
                else:
                    z_rows.append(mu)
        z = torch.stack(z_rows).reshape(n, k, zdim)
        kl = torch.cat(kl_terms).mean() if sample else zero
    z_init = z

    offset = math.sqrt(2.0 / (n + d))
    decode_count = [0]

    def decode(latents):
        """Point 4: weights (N, K, D), a fresh sample per decode."""
        i = decode_count[0]
        decode_count[0] += 1
        rows = []
        for c in range(n):
            for s in range(k):
                out = mlp_on_vector(params, "decoder", latents[c, s])
                mean, raw = out[:d], out[d:]
                if sample:
                    rows.append(mean + gaussian_std(raw, offset) * noise["w_eps"][i, c, s])
                else:
                    rows.append(mean)
        return torch.stack(rows).reshape(n, k, d)

    support_losses = []
    evaluation = [0]

    def support_loss(w):
        x = masked(x_support, "support_keep", evaluation[0])
        evaluation[0] += 1
        loss = summed_support_loss(x, w)
        support_losses.append(loss.detach())
        return loss

    # Point 6: LEO inner loop, z <- z - alpha * dL/dz, re-decoding after every step.
    for _ in range(latent_steps):
        z = _needs_grad(z)
        loss = support_loss(decode(z))
        (grad_z,) = torch.autograd.grad(loss, z, create_graph=create_graph, retain_graph=True)
        z = z - params["inner_lr"] * grad_z
    w = decode(z)

    # Point 7: encoder penalty against the stop-gradient of the adapted latents.
    if training and not cfg.random_prior:
        penalty = ((z.detach() - z_init) ** 2).mean()
    else:
        penalty = zero

    # Point 8: fine-tuning of the full (N, K, D) weights.
    for _ in range(ft_steps):
        w = _needs_grad(w)
        loss = support_loss(w)
        (grad_w,) = torch.autograd.grad(loss, w, create_graph=create_graph, retain_graph=True)
        w = w - params["finetune_lr"] * grad_w
    support_losses.append(summed_support_loss(x_support, w).detach())

    # Point 9: mean cross-entropy of the query set.
    xq = masked(x_query, "query_keep").reshape(n * q, d)
    labels = [c for c in range(n) for _ in range(q)]
    query_loss = torch.stack(cross_entropies(averaged_logits(xq, w), labels)).mean()

    # Point 10: the regularisers.
    l2 = l2_sum(params)
    orth = sum(orthogonality(params[name]) for name in layer_names(params, "decoder"))
    meta = (
        query_loss
        + cfg.kl_weight * kl
        + cfg.encoder_penalty_weight * penalty
        + cfg.l2_penalty_weight * l2
        + cfg.orthogonality_penalty_weight * orth
    )
    return {
        "meta_loss": meta,
        "query_loss": query_loss,
        "kl": kl,
        "encoder_penalty": penalty,
        "l2": l2,
        "orthogonality": orth,
        "z_init": z_init,
        "z_adapted": z,
        "w": w,
        "support_losses": support_losses,
    }
