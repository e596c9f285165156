"""Seeded N-way K-shot episode sampling on the device, without per-episode Python loops.

The split's rows are sorted by class (as :func:`leo.data.store.read_embeddings` returns them), so
a class is a contiguous block ``offsets[c]:offsets[c+1]``. An episode draws N distinct
classes, then K support and Q query rows per class without replacement, disjoint. All draws
come from an explicit ``torch.Generator``: the same seed gives the same episodes, whatever
model is being scored on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from leo.utils.errors import LeoInputError


@dataclass
class EpisodeIndices:
    """Row indices of a batch of episodes.

    Attributes:
        classes: (B, N) class labels; column n is the episode's class n.
        support: (B, N, K) row indices of the support examples.
        query: (B, N, Q) row indices of the query examples.
    """

    classes: Tensor
    support: Tensor
    query: Tensor


class EpisodeSampler:
    """Draws episode batches from one split.

    Args:
        embeddings: (n, D) rows sorted by class.
        labels: (n,) non-decreasing class labels in [0, C).
        num_classes: N.
        num_shots: K.
        num_queries: Q per class; None = all remaining up to ``per_class_total``.
        per_class_total: the protocol's examples per class (support + queries) when
            ``num_queries`` is None; None = the smallest class's size.
        class_names: for error messages.
        split: the split's name, for error messages.

    Raises:
        LeoInputError: fewer than N classes, or a class with fewer than K + Q examples
            (naming the class and the counts).
    """

    def __init__(
        self,
        embeddings: Tensor,
        labels: Tensor,
        num_classes: int,
        num_shots: int,
        num_queries: int | None,
        per_class_total: int | None = None,
        class_names: list[str] | None = None,
        split: str = "split",
    ) -> None:
        self.embeddings = embeddings
        self.device = embeddings.device
        counts = torch.bincount(labels.to(torch.int64))
        self.counts = counts.to(self.device)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(self.device)
        num_total = len(counts)
        names = class_names or [str(c) for c in range(num_total)]
        if num_total < num_classes:
            raise LeoInputError(
                f"{split}: {num_total} classes, fewer than the {num_classes} an episode needs"
            )
        if num_queries is None:
            total = int(counts.min()) if per_class_total is None else per_class_total
            num_queries = total - num_shots
        need = num_shots + num_queries
        if num_queries < 1 or int(counts.min()) < need:
            c = int(counts.argmin())
            raise LeoInputError(
                f"{split}: class {names[c]!r} has {int(counts[c])} examples, fewer than "
                f"{num_shots} support + {max(num_queries, 1)} query per episode"
            )
        self.n, self.k, self.q = num_classes, num_shots, num_queries
        self.num_total_classes = num_total
        self.max_count = int(counts.max())

    def indices(self, batch: int, generator: torch.Generator) -> EpisodeIndices:
        """Draw the row indices of ``batch`` episodes."""
        dev = self.device
        classes = torch.rand(batch, self.num_total_classes, generator=generator, device=dev)
        classes = classes.argsort(dim=1)[:, : self.n]  # N distinct classes per episode
        keys = torch.rand(batch, self.n, self.max_count, generator=generator, device=dev)
        pos = torch.arange(self.max_count, device=dev)
        keys = keys.masked_fill(pos >= self.counts[classes][..., None], 2.0)  # past the class end
        picked = keys.topk(self.k + self.q, dim=-1, largest=False, sorted=True).indices
        rows = self.offsets[classes][..., None] + picked
        return EpisodeIndices(classes, rows[..., : self.k], rows[..., self.k :])

    def gather(self, rows: Tensor) -> Tensor:
        """Embeddings of the given rows: (..., ) -> (..., D)."""
        return self.embeddings[rows]

    def sample(
        self, batch: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, EpisodeIndices]:
        """Support (B, N, K, D) and query (B, N, Q, D) embeddings plus their indices."""
        idx = self.indices(batch, generator)
        return self.gather(idx.support), self.gather(idx.query), idx
