"""SYNTHETIC few-shot problems (Gaussian class clusters), for tests and benchmarks only.

Nothing here is data: every split it makes says ``"synthetic": true`` in its provenance and
its class names start with ``synthetic-``. Difficulty is tunable: class means are random
directions scaled by ``separation``, examples add isotropic noise of scale ``noise`` (per
dimension, so the noise norm is about ``noise * sqrt(D)``), and rows are L2-normalised like
real embeddings.
"""

from __future__ import annotations

import numpy as np
import torch

from leo.data.store import EmbeddingSplit


def synthetic_split(
    num_classes: int,
    per_class: int,
    dim: int,
    *,
    separation: float = 1.0,
    noise: float = 0.05,
    seed: int = 0,
    split: str = "train",
) -> EmbeddingSplit:
    """A split of ``num_classes`` Gaussian clusters with ``per_class`` rows each, L2-normalised.

    Returns:
        EmbeddingSplit with embeddings (num_classes * per_class, dim), rows sorted by class.
    """
    gen = torch.Generator().manual_seed(seed)
    means = torch.nn.functional.normalize(torch.randn(num_classes, dim, generator=gen), dim=1)
    x = separation * means[:, None, :] + noise * torch.randn(
        num_classes, per_class, dim, generator=gen
    )
    x = torch.nn.functional.normalize(x.reshape(-1, dim), dim=1).contiguous()
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    names = [f"synthetic-{split}-{c:04d}" for c in range(num_classes)]
    ids = np.array([f"{names[c]}-{i:05d}" for c in range(num_classes) for i in range(per_class)])
    provenance = {"synthetic": True, "separation": separation, "noise": noise, "seed": seed}
    return EmbeddingSplit(x, labels, names, ids, provenance, split)
