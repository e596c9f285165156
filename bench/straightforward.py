"""A straightforward batched second-order eager LEO step: the comparator of the benchmark.

The same math as :mod:`leo.core.model` (docs/model.md, points 1-11), written the obvious way:
batched tensors with a leading episode dimension, the relation MLP on every pair, the
logits of every weight sample, inner gradients by ``torch.autograd.grad(create_graph=True)``
and ``torch.optim.Adam``. No vmap, no closed forms, no compilation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from leo.core.config import LEOConfig


def _mlp(x, ws):
    for i, w in enumerate(ws):
        x = x @ w
        if i < len(ws) - 1:
            x = F.relu(x)
    return x


def _std(raw, offset):
    return torch.clamp(torch.exp(raw) - (1.0 - offset), min=1e-10)


def _dropout(x, rate):
    return F.dropout(x, rate, training=rate > 0)


def straightforward_loss(p: dict, xs: torch.Tensor, xq: torch.Tensor, cfg: LEOConfig):
    """Meta-loss of a batch: xs (B, N, K, D), xq (B, N, Q, D)."""
    b, n, k, d = xs.shape
    q = xq.shape[2]
    zdim = cfg.latent_dim
    rate = cfg.dropout
    codes = _dropout(xs, rate) @ p["encoder.0"]  # (B, N, K, Z)
    flat = codes.reshape(b, n * k, zdim)
    pairs = torch.cat(
        [
            flat[:, :, None].expand(b, n * k, n * k, zdim),
            flat[:, None, :].expand(b, n * k, n * k, zdim),
        ],
        -1,
    )
    rel = _mlp(pairs, [p[f"relation.{i}"] for i in range(3)]).mean(2)
    rel = rel.reshape(b, n, k, 2 * zdim).mean(2, keepdim=True).expand(b, n, k, 2 * zdim)
    mu, raw = rel.chunk(2, -1)
    std = _std(raw, 0.0)
    z = mu + std * torch.randn_like(mu)
    normal = torch.distributions.Normal(mu, std)
    prior = torch.distributions.Normal(torch.zeros_like(z), torch.ones_like(z))
    kl = (normal.log_prob(z) - prior.log_prob(z)).mean(dim=(1, 2, 3))
    z0 = z
    offset = math.sqrt(2.0 / (n + d))
    ys = torch.arange(n).repeat_interleave(k).repeat(b)
    yq = torch.arange(n).repeat_interleave(q).repeat(b)

    def decode(z):
        m, r = (z @ p["decoder.0"]).chunk(2, -1)
        return m + _std(r, offset) * torch.randn_like(m)

    def support_loss(w):
        logits = torch.einsum("bmd,bnkd->bmnk", _dropout(xs, rate).reshape(b, n * k, d), w).mean(-1)
        return F.cross_entropy(logits.reshape(b * n * k, n), ys, reduction="sum")

    w = decode(z)
    loss = support_loss(w)
    for _ in range(cfg.inner_steps):
        (g,) = torch.autograd.grad(loss, z, create_graph=True)
        z = z - p["inner_lr"] * g
        w = decode(z)
        loss = support_loss(w)
    penalty = (z.detach() - z0).square().mean(dim=(1, 2, 3))
    for _ in range(cfg.finetune_steps):
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
        w = w - p["finetune_lr"] * g
        loss = support_loss(w)
    logits = torch.einsum("bmd,bnkd->bmnk", _dropout(xq, rate).reshape(b, n * q, d), w).mean(-1)
    qloss = F.cross_entropy(logits.reshape(b * n * q, n), yq, reduction="none").reshape(b, -1)
    per_episode = qloss.mean(1) + cfg.kl_weight * kl + cfg.encoder_penalty_weight * penalty
    l2 = sum(0.5 * v.square().sum() for key, v in p.items() if "lr" not in key)
    wd = p["decoder.0"]
    nrm = wd.norm(dim=1, keepdim=True) + 1e-32
    orth = ((wd @ wd.T) / (nrm @ nrm.T) - torch.eye(zdim)).square().mean()
    return per_episode.mean() + cfg.l2_penalty_weight * l2 + cfg.orthogonality_penalty_weight * orth


class StraightforwardStep:
    """Loss, backward, NaN fallback, clip by value then norm, torch.optim.Adam."""

    def __init__(self, params: dict, cfg: LEOConfig) -> None:
        self.params, self.cfg = params, cfg
        self.opt = torch.optim.Adam(params.values(), lr=cfg.outer_lr)

    def __call__(self, xs, xq):
        self.opt.zero_grad()
        loss = straightforward_loss(self.params, xs, xq, self.cfg)
        loss.backward()
        bad = (
            torch.isnan(loss)
            | torch.stack([p.grad.isnan().any() for p in self.params.values()]).any()
        )
        for key, p in self.params.items():
            fallback = torch.zeros_like(p) if "lr" in key else 1e-4 * p.detach()
            g = torch.where(bad, fallback, p.grad).clamp(-0.1, 0.1)
            p.grad = g * (0.1 / torch.clamp(g.norm(), min=0.1))
        self.opt.step()
        return loss.detach()
