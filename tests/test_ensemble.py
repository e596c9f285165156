"""Test-time latent ensembles: samples differ, S = 1 is one sampled classifier, mean-only is LEO's
evaluation, everything reproducible from the seeds."""

import numpy as np
import pytest
import torch

from leo.comparison.ensemble import (
    MEAN_ONLY,
    SampledAdapter,
    draw_sample_noise,
    ensemble_log_probs,
    ensemble_name,
    evaluate_ensembles,
)
from leo.core.config import make_config
from leo.core.model import adapt, init_params
from leo.data.synthetic import synthetic_split
from leo.meta.evaluate import eval_sampler, evaluate, score_queries

DIM = 12


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add overhead on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _setup(**kw):
    cfg = make_config(latent_dim=4, compile=False, eval_per_class_total=None, **kw)
    split = synthetic_split(10, 12, DIM, noise=0.4, seed=0, split="test")
    params = init_params(cfg, DIM, torch.Generator().manual_seed(1))
    return cfg, split, params, eval_sampler(split, cfg)


def test_samples_differ_from_each_other_and_from_the_mean():
    cfg, _, params, sampler = _setup()
    xs, _, _ = sampler.sample(4, torch.Generator().manual_seed(0))
    mean, draws = SampledAdapter(cfg)(params, xs, 3, torch.Generator().manual_seed(5))
    assert draws.shape == (3, 4, 5, DIM)
    for s in range(3):
        assert (draws[s] - mean).abs().max() > 1e-3
        for t in range(s):
            assert (draws[s] - draws[t]).abs().max() > 1e-3
    # the same generator seed gives the same samples
    _, again = SampledAdapter(cfg)(params, xs, 3, torch.Generator().manual_seed(5))
    assert torch.equal(draws, again)


def _episode(noise, b):
    return {k: v[b] for k, v in noise.items()}


def test_one_sample_ensemble_equals_one_sampled_classifier():
    cfg, _, params, sampler = _setup()
    results, _ = evaluate_ensembles(
        params, cfg, sampler, num_episodes=30, batch_size=15, seed=3, noise_seed=9,
        sample_counts=(1,), chunk=4,
    )  # fmt: skip
    gen, noise_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(9)
    expected = []
    for _ in range(2):  # two batches of 15, drawn in order
        idx = sampler.indices(15, gen)
        noise = draw_sample_noise(cfg, 15, DIM, noise_gen)
        w = torch.stack(
            [
                adapt(params, x, cfg, training=False, sample=True, noise=_episode(noise, b))[
                    "w_bar"
                ]
                for b, x in enumerate(sampler.gather(idx.support))
            ]
        )
        expected.append(score_queries(sampler, idx, w.detach()))
    expected = torch.cat(expected).double().numpy()
    assert np.allclose(results[ensemble_name(1)].accuracies, expected, atol=1e-6)
    assert not np.allclose(results[ensemble_name(1)].accuracies, results[MEAN_ONLY].accuracies)


def test_mean_only_equals_leo_evaluation_on_the_same_episodes():
    cfg, split, params, sampler = _setup()
    results, _ = evaluate_ensembles(
        params, cfg, sampler, num_episodes=60, batch_size=25, seed=4, sample_counts=(1, 5), chunk=7
    )
    leo = evaluate(params, cfg, split, num_episodes=60, batch_size=25, seed=4)
    assert np.allclose(results[MEAN_ONLY].accuracies, leo.accuracies, atol=1e-6)
    assert set(results) == {MEAN_ONLY, "ensemble-1", "ensemble-5"}
    for r in results.values():
        s = r.summary()
        assert s["episodes"] == 60 and 0.0 <= s["ece"] <= 1.0
        assert r.calibration.count.sum() == 60 * 5 * 11  # every query of every episode
        assert np.isclose(r.calibration.accuracy, r.accuracies.mean())


def test_deterministic_model_ensembles_collapse_to_the_mean():
    cfg, _, params, sampler = _setup(deterministic=True)
    results, _ = evaluate_ensembles(
        params, cfg, sampler, num_episodes=20, batch_size=20, seed=5, sample_counts=(1, 5)
    )
    for name in ("ensemble-1", "ensemble-5"):
        assert np.array_equal(results[name].accuracies, results[MEAN_ONLY].accuracies)
        assert np.isclose(results[name].ece, results[MEAN_ONLY].ece)


def test_ensemble_averages_probabilities_not_logits():
    # two classifiers, one query: confident in opposite directions, with different margins
    weights = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]], [[[0.0, 0.0], [1.0, 0.0]]]])  # (2,1,2,2)
    query = torch.tensor([[[1.0, 0.0]]])  # (1, 1, 2)
    logp = ensemble_log_probs(weights, query)[0, 0]
    p1, p2 = torch.softmax(torch.tensor([4.0, 0.0]), 0), torch.softmax(torch.tensor([0.0, 1.0]), 0)
    assert torch.allclose(logp.exp(), (p1 + p2) / 2)
    assert torch.allclose(ensemble_log_probs(weights[:1], query)[0, 0], torch.log(p1))


def test_diverged_classifiers_are_left_out_of_the_average():
    # episode 0: samples 0 and 2 finite, sample 1 diverged; episode 1: every sample diverged
    gen = torch.Generator().manual_seed(3)
    weights = torch.randn(3, 2, 4, 5, generator=gen)  # (S, B, N, D)
    weights[1, 0, 2, 1] = float("nan")
    weights[:, 1, 0, 0] = float("inf")
    query = torch.randn(2, 6, 5, generator=gen)
    logp = ensemble_log_probs(weights, query)
    assert torch.isfinite(logp).all()
    p0 = torch.softmax(query[0] @ weights[0, 0].T, -1)
    p2 = torch.softmax(query[0] @ weights[2, 0].T, -1)
    assert torch.allclose(logp[0].exp(), (p0 + p2) / 2, atol=1e-6)
    assert torch.allclose(logp[1].exp(), torch.full((6, 4), 0.25))


def test_diverged_classifiers_are_counted(monkeypatch):
    split = synthetic_split(8, 20, DIM, noise=0.3, seed=4, split="test")
    cfg = make_config(num_shots=1, latent_dim=4, compile=False, eval_per_class_total=None)
    params = init_params(cfg, DIM, torch.Generator().manual_seed(0))
    sampler = eval_sampler(split, cfg)

    def diverging(self, params, xs, num_samples, generator):  # every 2nd sample of episode 0
        mean = torch.randn(xs.shape[0], xs.shape[1], xs.shape[-1])
        draws = torch.randn(num_samples, *mean.shape)
        draws[::2, 0, 0, 0] = float("nan")
        return mean, draws

    monkeypatch.setattr(SampledAdapter, "__call__", diverging)
    results, _ = evaluate_ensembles(
        params, cfg, sampler, num_episodes=10, batch_size=5, seed=1, sample_counts=(1, 5)
    )
    # two batches: episode 0 of each loses samples 0, 2, 4
    assert results[MEAN_ONLY].summary()["diverged"] == 0
    assert (results["ensemble-1"].diverged, results["ensemble-1"].classifiers) == (2, 10)
    assert (results["ensemble-5"].diverged, results["ensemble-5"].classifiers) == (6, 50)
    assert all(np.isfinite(r.ece) for r in results.values())
