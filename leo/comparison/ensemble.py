"""Test-time latent ensembles: the paper's proposed future work, measured.

"A second potential improvement would be to draw multiple samples from the latent
distribution to leverage an ensemble of models at test time" (paper, conclusion). Per
episode we draw S classifiers ``adapt(..., training=False, sample=True)`` (latent z and
every decoded w sampled, no dropout), average their class PROBABILITIES on each query, and
predict the most probable class; "mean-only" is LEO's usual prediction from the means.

Randomness is explicit: the samples' noise is pre-drawn from a generator seeded by
``noise_seed`` (:func:`draw_sample_noise`: ``z_eps`` (N, K, Z) and ``w_eps``
(S_test + 1, N, K, D) per sample and episode), sample by sample over the whole episode
batch, so sample s of an episode does not depend on how queries are chunked. The ensembles
are nested: the S = 1 and S = 5 ensembles use the first 1 and 5 of the samples drawn for
the largest S, so their differences are paired too.

Episodes are the protocol's: the same ``seed`` and ``batch_size`` as
:func:`leo.meta.evaluate.evaluate` give the same episodes, so mean-only reproduces its accuracy.

Cost: an average of probabilities is not a linear classifier, so the grouped scoring of
:func:`leo.meta.evaluate.score_queries` does not apply; each episode's queries are gathered,
``chunk`` episodes at a time ((chunk, N, Q, D) floats: 20 episodes of 5 x 599 x 640 are
about 150 MB), and scored by all S classifiers: O(S * episodes * N * Q * N * D) multiply-adds
plus S adaptations per episode, about S + 1 times LEO's evaluation. Fine for Omniglot-sized
splits and for a few thousand miniImageNet episodes; budget accordingly for 10,000.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from leo.comparison.options import SAMPLE_COUNTS
from leo.comparison.stats import CalibrationTotals, mean_ci95
from leo.core.config import LEOConfig
from leo.core.model import Params, adapt
from leo.core.step import batch_adapt
from leo.meta.episodes import EpisodeSampler
from leo.utils.compiling import maybe_compile

MEAN_ONLY = "mean-only"


def ensemble_name(num_samples: int) -> str:
    """Result key of the S-sample ensemble, e.g. ``"ensemble-5"``."""
    return f"ensemble-{num_samples}"


def draw_sample_noise(
    cfg: LEOConfig, batch: int, dim: int, generator: torch.Generator
) -> dict[str, Tensor]:
    """Noise of one evaluation-time sample for ``batch`` episodes (no dropout masks).

    Returns:
        ``z_eps`` (B, N, K, Z) and ``w_eps`` (B, S_test + 1, N, K, D), standard normals.
    """
    n, k, steps = cfg.num_classes, cfg.num_shots, cfg.test_inner_steps
    dev = generator.device
    return {
        "z_eps": torch.randn(batch, n, k, cfg.latent_dim, generator=generator, device=dev),
        "w_eps": torch.randn(batch, steps + 1, n, k, dim, generator=generator, device=dev),
    }


def batch_adapt_sampled(params: Params, xs: Tensor, noise: dict, cfg: LEOConfig) -> Tensor:
    """One sampled classifier per episode: (B, N, K, D) and noise -> ``w_bar`` (B, N, D)."""

    def one(x, nz):
        return adapt(params, x, cfg, training=False, noise=nz, sample=True)["w_bar"]

    return torch.func.vmap(one)(xs, noise)


class SampledAdapter:
    """Draws S sampled classifiers per episode (compiled when ``cfg.compile`` says so)."""

    def __init__(self, cfg: LEOConfig, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        sampled = functools.partial(batch_adapt_sampled, cfg=cfg)
        means = functools.partial(batch_adapt, cfg=cfg)
        self.sampled = maybe_compile(sampled, cfg.compile, device)
        self.means = maybe_compile(means, cfg.compile, device)

    @torch.no_grad()
    def __call__(
        self, params: Params, xs: Tensor, num_samples: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Mean classifier (B, N, D) and ``num_samples`` sampled ones (S, B, N, D)."""
        params = {k: v.detach() for k, v in params.items()}
        mean = self.means(params, xs)["w_bar"]
        draws = [
            self.sampled(
                params, xs, draw_sample_noise(self.cfg, xs.shape[0], xs.shape[-1], generator)
            )
            for _ in range(num_samples)
        ]
        return mean, torch.stack(draws)


def ensemble_log_probs(weights: Tensor, queries: Tensor) -> Tensor:
    """log of the average class probability of S classifiers, leaving out diverged ones.

    A sampled classifier whose adaptation diverged (any non-finite weight: rare, when a
    sampled code sends the latent inner loop far out) says nothing about the classes, so it
    is left out of its episode's average; an episode with no finite classifier predicts
    uniform probabilities (1/N, the first class on ties).

    Args:
        weights: (S, B, N, D) classifiers of B episodes.
        queries: (B, M, D) query embeddings of each episode.

    Returns:
        (B, M, N): log((1/S') sum_s softmax(x W_s^T)) over the S' finite classifiers, by
        logsumexp (S = 1 is log_softmax).
    """
    finite = finite_classifiers(weights)  # (S, B)
    safe = torch.where(finite[..., None, None], weights, torch.zeros_like(weights))
    logits = torch.einsum("bmd,sbnd->sbmn", queries, safe)
    logp = torch.log_softmax(logits, dim=-1).masked_fill(~finite[..., None, None], -math.inf)
    count = finite.sum(dim=0)  # (B,)
    avg = torch.logsumexp(logp, dim=0) - torch.log(count.clamp(min=1).to(logp.dtype))[:, None, None]
    uniform = torch.full_like(avg, -math.log(weights.shape[2]))
    return torch.where((count > 0)[:, None, None], avg, uniform)


def finite_classifiers(weights: Tensor) -> Tensor:
    """(S, B, N, D) -> (S, B) bool: the classifiers whose weights are all finite."""
    return torch.isfinite(weights).flatten(2).all(dim=-1)


@dataclass
class EnsembleResult:
    """One predictor's per-episode accuracies and pooled calibration over the same episodes."""

    accuracies: np.ndarray  # (num_episodes,)
    calibration: CalibrationTotals  # over every query of every episode
    diverged: int = 0  # classifiers left out of the averages (non-finite weights)
    classifiers: int = 0  # classifiers drawn in all (S per episode)

    @property
    def ece(self) -> float:
        return self.calibration.ece

    def summary(self) -> dict:
        mean, ci = mean_ci95(self.accuracies)
        return {
            "accuracy": mean,
            "ci95": ci,
            "ece": self.ece,
            "episodes": len(self.accuracies),
            "diverged": self.diverged,
            "classifiers": self.classifiers,
        }


def evaluate_ensembles(
    params: Params,
    cfg: LEOConfig,
    sampler: EpisodeSampler,
    *,
    num_episodes: int,
    batch_size: int = 200,
    seed: int = 1,
    noise_seed: int = 0,
    sample_counts: tuple[int, ...] = SAMPLE_COUNTS,
    chunk: int = 20,
) -> tuple[dict[str, EnsembleResult], float]:
    """Accuracy and ECE of mean-only LEO and of S-sample ensembles on the same episodes.

    Args:
        params, cfg: a trained LEO model (eval step counts apply).
        sampler: the split's protocol sampler (:func:`leo.meta.evaluate.eval_sampler`).
        num_episodes, batch_size, seed: the episodes, as :func:`leo.meta.evaluate.evaluate`.
        noise_seed: seeds the samples' generator (on the sampler's device).
        sample_counts: the ensemble sizes S; the largest is drawn, the others are prefixes.
        chunk: episodes whose queries are gathered at once.

    Returns:
        ({``"mean-only"``: ..., ``"ensemble-S"``: ... for each S}, wall seconds).
    """
    gen = torch.Generator(device=sampler.device).manual_seed(seed)
    noise_gen = torch.Generator(device=sampler.device).manual_seed(noise_seed)
    adapter = SampledAdapter(cfg, sampler.device)
    names = [MEAN_ONLY] + [ensemble_name(s) for s in sample_counts]
    accs: dict[str, list[Tensor]] = {k: [] for k in names}
    cal = {k: CalibrationTotals() for k in names}
    diverged = dict.fromkeys(names, 0)
    start, done = time.perf_counter(), 0
    while done < num_episodes:
        bsz = min(batch_size, num_episodes - done)
        idx = sampler.indices(bsz, gen)
        mean_w, sampled_w = adapter(
            params, sampler.gather(idx.support), max(sample_counts), noise_gen
        )
        diverged[MEAN_ONLY] += int((~finite_classifiers(mean_w[None])).sum())
        for s in sample_counts:
            diverged[ensemble_name(s)] += int((~finite_classifiers(sampled_w[:s])).sum())
        n, q = idx.query.shape[1:]
        labels = torch.arange(n, device=sampler.device).repeat_interleave(q)
        for lo in range(0, bsz, chunk):
            hi = min(lo + chunk, bsz)
            xq = sampler.gather(idx.query[lo:hi]).reshape(hi - lo, n * q, -1)  # (c, N*Q, D)
            preds = {MEAN_ONLY: ensemble_log_probs(mean_w[None, lo:hi], xq)}
            for s in sample_counts:
                preds[ensemble_name(s)] = ensemble_log_probs(sampled_w[:s, lo:hi], xq)
            for name, logp in preds.items():
                conf, pred = logp.max(dim=-1)  # (c, N*Q)
                correct = pred == labels
                accs[name].append(correct.to(torch.float64).mean(dim=1).cpu())
                probability = conf.exp().clamp(max=1.0)  # rounding can give 1 + 1e-7
                cal[name].add(probability.reshape(-1).cpu(), correct.reshape(-1).cpu())
        done += bsz
    drawn = {MEAN_ONLY: 1, **{ensemble_name(s): s for s in sample_counts}}
    results = {
        k: EnsembleResult(torch.cat(accs[k]).numpy(), cal[k], diverged[k], drawn[k] * num_episodes)
        for k in names
    }
    return results, time.perf_counter() - start
