"""Batches of episodes: vmap over episodes, the outer gradient step, compiled once.

``MetaStep`` is the ``train_step(state, batch, noise) -> metrics`` of the training loop.
Its meta-gradient comes from one of two computations of the same math:

- ``cfg.gradients == "explicit"`` (default; linear encoder and decoder): the batch's forward
  and hand-derived reverse pass of :mod:`leo.core.explicit`, plain batched tensor code;
- otherwise: the per-episode math of :mod:`leo.core.model` under ``torch.func.vmap`` (each
  episode its own randomness) and autograd.

Either is wrapped whole in ``torch.compile`` when ``cfg.compile`` says so on this device
(:func:`leo.utils.compiling.maybe_compile`); the NaN fallback,
clipping and Adam run outside the compiled region.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from leo.core import explicit
from leo.core.config import LEOConfig
from leo.core.model import Params, adapt, episode_loss, meta_loss
from leo.core.optim import Adam, clip_gradients, nan_fallback
from leo.utils.compiling import maybe_compile


def batch_meta_loss(
    params: Params, xs: Tensor, xq: Tensor, cfg: LEOConfig, noise: dict | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Meta-loss of a batch (point 11) and its per-batch metrics.

    Args:
        xs: (B, N, K, D) support; xq: (B, N, Q, D) queries; noise: pre-drawn or None.
    """

    def one(x_s, x_q, nz):
        return episode_loss(params, x_s, x_q, cfg, nz)

    in_dims = (0, 0, 0 if noise is not None else None)
    q, kl, pen, acc = torch.func.vmap(one, in_dims=in_dims, randomness="different")(xs, xq, noise)
    loss = meta_loss(params, q, kl, pen, cfg)
    return loss, {
        "query_loss": q.mean(),
        "kl": kl.mean(),
        "encoder_penalty": pen.mean(),
        "accuracy": acc.mean(),
    }


def batch_adapt(params: Params, xs: Tensor, cfg: LEOConfig) -> dict[str, Tensor]:
    """Evaluation-mode adaptation of a batch: (B, N, K, D) -> ``w_bar`` (B, N, D) and codes."""
    return torch.func.vmap(lambda x: adapt(params, x, cfg, training=False))(xs)


class MetaStep:
    """One outer step: loss, gradients (second order unless cfg.first_order), update."""

    def __init__(self, cfg: LEOConfig, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        self.explicit = cfg.gradients == "explicit" and explicit.covers(cfg)
        loss_fn = functools.partial(batch_meta_loss, cfg=cfg)
        grad_fn = functools.partial(explicit.loss_and_grads, cfg=cfg)
        self.loss_fn = maybe_compile(loss_fn, cfg.compile, device)
        self.grad_fn = maybe_compile(grad_fn, cfg.compile, device)

    def gradients(
        self, params: Params, xs: Tensor, xq: Tensor, noise: dict | None = None
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """(loss, metrics, d loss / d params) of a batch, before fallback and clipping."""
        if self.explicit and noise is not None:
            return self.grad_fn(params, xs, xq, noise)
        loss, metrics = self.loss_fn(params, xs, xq, noise=noise)
        names = list(params)
        # allow_unused: with 0 latent (or fine-tuning) steps a step size is not in the graph;
        # its gradient is then zero and the update leaves it alone.
        raw = torch.autograd.grad(
            loss, [params[k] for k in names], allow_unused=True, materialize_grads=True
        )
        return loss, metrics, dict(zip(names, raw, strict=True))

    def __call__(
        self, params: Params, opt: Adam, xs: Tensor, xq: Tensor, noise: dict | None = None
    ) -> dict[str, Tensor]:
        """Update ``params`` in place; return detached metric tensors (no host sync).

        ``noise`` (:func:`leo.core.noise.draw_noise`) is what the explicit gradients read; without
        it the autograd path draws its noise in-graph.
        """
        loss, metrics, grads = self.gradients(params, xs, xq, noise)
        grads = nan_fallback(params, loss.detach(), grads)
        grads = clip_gradients(grads, self.cfg.gradient_threshold, self.cfg.gradient_norm_threshold)
        opt.step(params, grads)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}


class BatchAdapter:
    """Evaluation-mode adaptation of episode batches: :func:`leo.core.explicit.adapt` where it
    covers the config (plain batched tensors), :func:`batch_adapt` (vmap) otherwise;
    compiled when ``cfg.compile`` says so on ``device``."""

    def __init__(self, cfg: LEOConfig, device: torch.device | str | None = None) -> None:
        if explicit.covers(cfg):
            fn = functools.partial(explicit.adapt, cfg=cfg)
        else:
            fn = functools.partial(batch_adapt, cfg=cfg)
        self.fn = maybe_compile(fn, cfg.compile, device)

    @torch.no_grad()
    def __call__(self, params: Params, xs: Tensor) -> dict[str, Tensor]:
        return self.fn({k: v.detach() for k, v in params.items()}, xs)
