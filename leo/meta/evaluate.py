"""The paper's evaluation protocol: 10,000 seeded episodes, all remaining examples as queries.

Scoring never gathers the queries (600 - K per class on miniImageNet would be ~1.5 GB per
batch of 200 episodes). A class's rows are one contiguous block of the split, so for every
class c the block is multiplied once by the classifiers of all episodes that contain c;
the query rows of each episode are then picked out of the boolean "correct" matrix. The
result equals scoring each episode's gathered queries (tested against that plain form).

Any method that ends in a linear classifier (weights (N, D), optional bias (N,)) is scored
on the same episodes: LEO here, baselines through :func:`evaluate_classifier`.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from leo.core.config import LEOConfig
from leo.core.model import Params
from leo.core.step import BatchAdapter
from leo.meta.episodes import EpisodeIndices, EpisodeSampler
from leo.utils.device import DEFAULT_CPU_THREADS, resolve_device
from leo.utils.device import cpu_threads as cpu_threads_of

Classifier = Callable[[Tensor], tuple[Tensor, Tensor | None]]  # (B,N,K,D) -> (B,N,D), (B,N)|None


@dataclass
class EvalResult:
    """Per-episode accuracies and their summary."""

    accuracies: np.ndarray  # (num_episodes,)
    wall_seconds: float
    queries_per_class: int | None = None  # the protocol's queries per class (None: unknown)

    @property
    def mean(self) -> float:
        return float(self.accuracies.mean())

    @property
    def ci95(self) -> float:
        """1.96 * sample std / sqrt(n): the half-width of the 95% confidence interval."""
        n = len(self.accuracies)
        return float(1.96 * self.accuracies.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")

    @property
    def num_episodes(self) -> int:
        return len(self.accuracies)

    def summary(self) -> dict:
        return {
            "accuracy": self.mean,
            "ci95": self.ci95,
            "episodes": self.num_episodes,
            "queries_per_class": self.queries_per_class,
            "seconds": self.wall_seconds,
        }


def score_queries(
    sampler: EpisodeSampler, idx: EpisodeIndices, weights: Tensor, bias: Tensor | None = None
) -> Tensor:
    """Accuracy of each episode's linear classifier on its query rows.

    Args:
        sampler: the split's sampler (embeddings sorted by class, offsets).
        idx: the episodes' indices; ``idx.query`` (B, N, Q).
        weights: (B, N, D) classifier of each episode; logit = x . w_n (+ bias_n).
        bias: (B, N) or None.

    Returns:
        (B,) fraction of the N * Q queries classified correctly.
    """
    b, n, q = idx.query.shape
    correct = torch.zeros(b, n, dtype=torch.int64, device=weights.device)
    flat_classes = idx.classes.reshape(-1)
    order = torch.argsort(flat_classes, stable=True)
    present, counts = torch.unique_consecutive(flat_classes[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    for c, start, m in zip(present.tolist(), starts.tolist(), counts.tolist(), strict=True):
        pairs = order[start : start + m]  # flat (episode, slot) indices holding class c
        eb, slot = pairs // n, pairs % n
        lo, hi = int(sampler.offsets[c]), int(sampler.offsets[c + 1])
        scores = sampler.embeddings[lo:hi] @ weights[eb].reshape(m * n, -1).T  # (rows, m*N)
        scores = scores.reshape(hi - lo, m, n)
        if bias is not None:
            scores = scores + bias[eb][None]
        hit = scores.argmax(dim=-1) == slot[None]  # (rows, m)
        rows = idx.query[eb, slot] - lo  # (m, Q) positions inside the block
        correct[eb, slot] = hit.T.gather(1, rows).sum(dim=1)
    return correct.sum(dim=1).to(torch.float32) / (n * q)


def evaluate_classifier(
    classifier: Classifier,
    sampler: EpisodeSampler,
    *,
    num_episodes: int,
    batch_size: int,
    seed: int,
    progress: bool = False,
    desc: str = "evaluate",
) -> EvalResult:
    """Score ``classifier`` on ``num_episodes`` episodes drawn from ``seed`` (same seed, same
    episodes, whatever the classifier)."""
    gen = torch.Generator(device=sampler.device).manual_seed(seed)
    start = time.perf_counter()
    accs = []
    done = 0
    with tqdm(total=num_episodes, desc=desc, unit="ep", disable=not progress) as bar:
        while done < num_episodes:
            bsz = min(batch_size, num_episodes - done)
            idx = sampler.indices(bsz, gen)
            with torch.no_grad():
                weights, bias = classifier(sampler.gather(idx.support))
                accs.append(score_queries(sampler, idx, weights, bias).cpu())
            done += bsz
            bar.update(bsz)
    return EvalResult(
        torch.cat(accs).numpy().astype(np.float64), time.perf_counter() - start, sampler.q
    )


def leo_classifier(params: Params, cfg: LEOConfig) -> Classifier:
    """LEO at evaluation (means, no dropout, eval step counts) as a batched classifier."""
    adapter = BatchAdapter(cfg, next(iter(params.values())).device)

    def classify(support: Tensor) -> tuple[Tensor, None]:
        return adapter(params, support)["w_bar"], None

    return classify


def eval_sampler(split, cfg: LEOConfig, device=None) -> EpisodeSampler:
    """The protocol's sampler for a split: all remaining examples (up to the per-class total)."""
    return EpisodeSampler(
        split.embeddings.to(device) if device is not None else split.embeddings,
        split.labels,
        cfg.num_classes,
        cfg.num_shots,
        None,
        per_class_total=_per_class_total(split, cfg),
        class_names=split.class_names,
        split=split.split,
    )


def _per_class_total(split, cfg: LEOConfig) -> int:
    return query_budget(split, cfg).per_class + cfg.num_shots


@dataclass(frozen=True)
class QueryBudget:
    """How many queries per class the protocol's episodes of a split hold, and why.

    The protocol takes every example of a class that is not in the support set, up to
    ``cfg.eval_per_class_total`` per class (600 on miniImageNet), the same number for every
    class of every episode; a class smaller than that total lowers it for ALL episodes.

    Attributes:
        per_class: queries per class in every episode.
        smallest_class: the split's smallest class and ``smallest_count`` its examples.
        capped: True when the smallest class, not the protocol's total, sets ``per_class``.
    """

    per_class: int
    smallest_class: str
    smallest_count: int
    capped: bool

    def describe(self) -> str:
        """One line for logs and metrics."""
        why = (
            f"capped by the smallest class {self.smallest_class!r} ({self.smallest_count} examples)"
            if self.capped
            else "the protocol's total per class"
        )
        return f"{self.per_class} queries per class ({why})"


def query_budget(split, cfg: LEOConfig) -> QueryBudget:
    """The protocol's queries per class on ``split`` (an EmbeddingSplit) for ``cfg``'s shots."""
    counts = torch.bincount(split.labels.cpu(), minlength=len(split.class_names))
    c = int(counts.argmin())
    smallest = int(counts[c])
    total = smallest if cfg.eval_per_class_total is None else cfg.eval_per_class_total
    capped = cfg.eval_per_class_total is not None and smallest < total
    return QueryBudget(min(total, smallest) - cfg.num_shots, split.class_names[c], smallest, capped)


def evaluate(
    params: Params,
    cfg: LEOConfig,
    split,
    *,
    num_episodes: int = 10_000,
    batch_size: int = 200,
    seed: int = 1,
    device=None,
    progress: bool = False,
    cpu_threads: int | None = DEFAULT_CPU_THREADS,
) -> EvalResult:
    """Meta-test a LEO model by the paper's protocol on ``split`` (an EmbeddingSplit).

    Args:
        params, cfg: the model (e.g. from :func:`leo.meta.train.load_checkpoint`).
        split: the meta-test split.
        num_episodes, batch_size, seed: the episodes (the same seed, the same episodes for
            every model).
        device: where to run (default: CUDA when present).
        progress: show a progress bar.
        cpu_threads: intra-op CPU threads while it runs (None: torch's setting).

    Every episode holds the same number of queries per class: all remaining examples, up to
    ``cfg.eval_per_class_total`` (:func:`query_budget`); when the split's smallest class
    lowers that number, a warning says so, and ``EvalResult.queries_per_class`` records it.
    """
    budget = query_budget(split, cfg)
    if budget.capped:
        warnings.warn(f"{split.split}: {budget.describe()}", stacklevel=2)
    with cpu_threads_of(cpu_threads):
        sampler = eval_sampler(split, cfg, resolve_device(device))
        params = {k: v.to(sampler.device) for k, v in params.items()}
        return evaluate_classifier(
            leo_classifier(params, cfg),
            sampler,
            num_episodes=num_episodes,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            desc=f"evaluate {cfg.num_shots}-shot",
        )
