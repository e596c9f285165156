"""LEO's evaluation-mode adaptation for a support set with any number of shots per class.

The pipeline's episodes have K shots of every class, stored (N, K, D). A user's support set
may have K_n shots of class n, all different. This module computes, for such a set, exactly
what :func:`leo.core.model.adapt` (``training=False``) computes when all K_n are equal, by
writing every average over "the K shots of class n" as a sum divided by K_n, rather than by
padding (padding would need masks in the relation network's averages and in the loss, and
a padded shot would still count in the ``1/K`` of each latent step).

What K enters at evaluation (no dropout, no sampling: every latent of a class is its mean),
with M = sum_n K_n support rows x_i of labels y_i and codes c_i = g_e(x_i):

- relation network: per row, the mean over all M rows j of ``g_r(c_i, c_j)``; per class,
  the mean over its K_n rows: ``(mu_n, .) = mean_{i in n} mean_j g_r(c_i, c_j)``;
- latent step: all K_n latents of class n start at mu_n and get the same gradient
  (the logits see them only through w_n = mean_k g_d(z_nk)), so they stay one latent z_n and
  ``z_n <- z_n - alpha * (1/K_n) J_d(z_n)^T dL/dw_n`` with L the summed support
  cross-entropy of ``x_i . w``;
- fine-tuning: ``w_n <- w_n - lambda * (1/K_n) dL/dw_n``.

With equal K this is the same arithmetic as :func:`leo.core.explicit.adapt` up to the order
of float additions (``tests/test_classify_adapt.py`` checks it, and checks unequal K against
a plain per-shot autograd version). The decoder's vector-Jacobian product comes from
``torch.func.vjp``, so a hidden-layer decoder (``cfg.hidden_dim``) is covered too.

Shapes: M support rows, N classes, D embedding dim, Z latent dim.
"""

from __future__ import annotations

import torch
from torch import Tensor

from leo.core.config import LEOConfig
from leo.core.model import Params, decode, encode


def class_counts(labels: Tensor, num_classes: int) -> Tensor:
    """K_n: shots per class, float ``(N,)``, from int64 labels ``(M,)`` in ``[0, N)``."""
    return torch.bincount(labels, minlength=num_classes).to(torch.float32)


def relation_means(params: Params, codes: Tensor, labels: Tensor, counts: Tensor) -> Tensor:
    """Relation network output per class, ``(N, 2Z)``, for codes ``(M, Z)`` of any K_n.

    ``mean_{i in n} mean_j relu(relu(c_i R0a + c_j R0b) R1) R2``: the last layer is linear,
    so it is applied after the averages (as :func:`leo.core.model.relation_fast`).
    """
    z = codes.shape[1]
    w0, w1, w2 = (params[f"relation.{i}"] for i in range(3))
    h = torch.relu((codes @ w0[:z])[:, None, :] + (codes @ w0[z:])[None, :, :])  # (M, M, 2Z)
    h = torch.relu(h @ w1).mean(dim=1)  # (M, 2Z)
    sums = h.new_zeros(len(counts), h.shape[1]).index_add_(0, labels, h)
    return (sums / counts[:, None]) @ w2


def support_grad(x: Tensor, labels: Tensor, w: Tensor) -> Tensor:
    """d/dw of the summed cross-entropy of ``x w^T``: ``(softmax - onehot)^T x``, ``(N, D)``.

    Args:
        x: ``(M, D)`` support rows; labels: int64 ``(M,)``; w: ``(N, D)`` classifier.
    """
    p = torch.softmax(x @ w.T, dim=-1)
    p = p - torch.nn.functional.one_hot(labels, w.shape[0]).to(p.dtype)
    return p.T @ x


def decoder_mean(params: Params, z: Tensor) -> Tensor:
    """The decoder's mean half: latents ``(N, Z)`` -> weights ``(N, D)``."""
    return decode(params, z)[0]


def adapt_ragged(
    params: Params, x: Tensor, labels: Tensor, num_classes: int, cfg: LEOConfig
) -> dict[str, Tensor]:
    """Evaluation-mode LEO adaptation of one support set with K_n shots of class n.

    Args:
        params: LEO's named parameters (:mod:`leo.core.model`).
        x: ``(M, D)`` support embeddings (L2-normalised, as in the pipeline).
        labels: int64 ``(M,)`` class of each row, every class in ``[0, N)`` present.
        num_classes: N.
        cfg: the config (evaluation step counts, ``random_prior``).

    Returns:
        ``w_bar`` ``(N, D)``: the class weights (logit of a query q for class n is
        ``q . w_bar[n]``); ``z_init`` and ``z_adapted`` ``(N, Z)``: the latents before and
        after the latent steps.

    Raises:
        ValueError: a class with no row.
    """
    counts = class_counts(labels, num_classes).to(x.device)
    if (counts == 0).any():
        raise ValueError(f"class {int((counts == 0).nonzero()[0])} has no support example")
    zdim = cfg.latent_dim
    if cfg.random_prior:
        z = x.new_zeros(num_classes, zdim)
    else:
        z = relation_means(params, encode(params, x), labels, counts)[:, :zdim]
    z_init = z
    for _ in range(cfg.test_inner_steps):
        w, vjp = torch.func.vjp(lambda z_: decoder_mean(params, z_), z)
        (g,) = vjp(support_grad(x, labels, w))
        z = z - params["inner_lr"] * (g / counts[:, None])
    w = decoder_mean(params, z)
    for _ in range(cfg.test_finetune_steps):
        w = w - params["finetune_lr"] * (support_grad(x, labels, w) / counts[:, None])
    return {"w_bar": w, "z_init": z_init, "z_adapted": z}


def check_params(params: Params, cfg: LEOConfig, dim: int) -> list[str]:
    """Problems with ``params`` for ``cfg`` and embeddings of width ``dim`` (empty: fine).

    Compares names and shapes with :func:`leo.core.model.init_params`.
    """
    from leo.core.model import init_params

    expected = {k: tuple(v.shape) for k, v in init_params(cfg, dim).items()}
    problems = []
    for name, shape in expected.items():
        if name not in params:
            problems.append(f"missing parameter '{name}'")
        elif tuple(params[name].shape) != shape:
            problems.append(f"'{name}' has shape {tuple(params[name].shape)}, expected {shape}")
    problems += [f"unexpected parameter '{k}'" for k in params if k not in expected]
    return problems
