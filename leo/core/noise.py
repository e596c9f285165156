"""Pre-drawn noise for a batch of meta-training episodes, from an explicit generator.

:func:`leo.core.model.adapt` and :func:`leo.core.model.episode_loss` accept this dict in place of
in-graph sampling, so a run is reproducible bit-for-bit and an independent implementation
can be fed exactly the same randomness. Keys (leading batch dimension B):

- ``enc_keep`` (B, N, K, D): dropout keep-mask (scaled by 1/(1-rate)) for the encoder input;
- ``z_eps`` (B, N, K, Z): standard normals for the latent sample (or the random prior);
- ``w_eps`` (B, S+1, N, K, D): standard normals for the weight sample of each decode;
- ``support_keep`` (B, S+F, N, K, D): keep-masks, one per support-loss evaluation
  (S latent steps, then F fine-tuning steps);
- ``query_keep`` (B, N, Q, D): keep-mask for the query set.
"""

from __future__ import annotations

import torch

from leo.core.config import LEOConfig


def draw_noise(
    cfg: LEOConfig,
    batch: int,
    num_queries: int,
    dim: int,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Draw every random number one meta-training batch needs, on the generator's device."""
    n, k, z = cfg.num_classes, cfg.num_shots, cfg.latent_dim
    s, f = cfg.inner_steps, cfg.finetune_steps
    rate = cfg.dropout
    device = generator.device
    stochastic = not cfg.deterministic

    def keep(*shape):  # (u >= rate) / (1 - rate), in place: the same values, no copies
        u = torch.rand(shape, generator=generator, device=device)
        return u.ge_(rate).div_(1.0 - rate)

    out: dict[str, torch.Tensor] = {}
    if stochastic:
        out["z_eps"] = torch.randn(batch, n, k, z, generator=generator, device=device)
        out["w_eps"] = torch.randn(batch, s + 1, n, k, dim, generator=generator, device=device)
    if rate > 0:
        if not cfg.random_prior:
            out["enc_keep"] = keep(batch, n, k, dim)
        out["support_keep"] = keep(batch, max(s + f, 1), n, k, dim)
        out["query_keep"] = keep(batch, n, num_queries, dim)
    return out
