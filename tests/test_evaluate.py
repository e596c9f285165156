"""Evaluation: grouped scoring equals plain per-episode scoring; CI arithmetic; fixed episodes."""

import math

import numpy as np
import torch

from leo.core.config import make_config
from leo.core.model import init_params
from leo.data.synthetic import synthetic_split
from leo.meta.episodes import EpisodeSampler
from leo.meta.evaluate import EvalResult, evaluate, evaluate_classifier, score_queries


def _plain_scores(emb, idx, weights, bias):
    """Gather every episode's queries and classify them one by one."""
    out = []
    for b in range(idx.query.shape[0]):
        hits, total = 0, 0
        for n in range(idx.query.shape[1]):
            for row in idx.query[b, n].tolist():
                logits = weights[b] @ emb[row] + (0 if bias is None else bias[b])
                hits += int(int(logits.argmax()) == n)
                total += 1
        out.append(hits / total)
    return torch.tensor(out)


def test_grouped_scoring_equals_plain_scoring():
    split = synthetic_split(9, 11, 8, noise=0.4, seed=0)
    sampler = EpisodeSampler(split.embeddings, split.labels, 4, 2, None)
    gen = torch.Generator().manual_seed(0)
    idx = sampler.indices(25, gen)
    weights = torch.randn(25, 4, 8, generator=gen)
    bias = torch.randn(25, 4, generator=gen)
    for b in (None, bias):
        got = score_queries(sampler, idx, weights, b)
        assert torch.allclose(got, _plain_scores(split.embeddings, idx, weights, b))


def test_ci95_is_1_96_sample_std_over_sqrt_n():
    accs = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    r = EvalResult(accs, 0.0)
    assert math.isclose(r.mean, 0.6)
    assert math.isclose(r.ci95, 1.96 * np.sqrt(0.1) / math.sqrt(5))


def test_same_seed_scores_every_method_on_the_same_episodes():
    split = synthetic_split(10, 12, 6, noise=0.3, seed=1)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, 1, None)
    seen = []

    def record(support):
        seen.append(support.clone())
        return torch.zeros(support.shape[0], 5, 6), None

    evaluate_classifier(record, sampler, num_episodes=30, batch_size=10, seed=7)
    evaluate_classifier(record, sampler, num_episodes=30, batch_size=10, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(seen[:3], seen[3:], strict=True))


def test_leo_evaluation_is_deterministic_and_counts_episodes():
    cfg = make_config(latent_dim=4, compile=False, eval_per_class_total=None)
    split = synthetic_split(8, 10, 12, noise=0.2, seed=2, split="test")
    params = init_params(cfg, 12, torch.Generator().manual_seed(0))
    a = evaluate(params, cfg, split, num_episodes=50, batch_size=20, seed=3)
    b = evaluate(params, cfg, split, num_episodes=50, batch_size=20, seed=3)
    assert a.num_episodes == 50 and np.array_equal(a.accuracies, b.accuracies)
    assert 0.0 <= a.mean <= 1.0
