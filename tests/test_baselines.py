"""Baselines against direct per-query computations; logistic regression converges; registry."""

import dataclasses

import pytest
import torch

from leo.comparison.baselines import (
    LogisticRegressionConfig,
    fit_logistic_regression,
    logistic_regression,
    nearest_mean_cosine,
    nearest_mean_euclidean,
)
from leo.comparison.maml import MAMLConfig
from leo.comparison.methods import METHODS, method_classifier, method_config, train_method
from leo.core.config import make_config
from leo.data.synthetic import synthetic_split
from leo.meta.episodes import EpisodeSampler
from leo.meta.evaluate import evaluate_classifier, score_queries
from leo.meta.train import load_checkpoint
from leo.utils.errors import LeoInputError


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add overhead on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _episodes(emb, labels, n=5, k=3, batch=40, seed=0):
    sampler = EpisodeSampler(emb, labels, n, k, None)
    idx = sampler.indices(batch, torch.Generator().manual_seed(seed))
    return sampler, idx


def _direct_accuracy(sampler, idx, predict):
    """predict(support (N, K, D), queries (M, D)) -> (M,) class slots, one episode at a time."""
    out = []
    for b in range(idx.query.shape[0]):
        support = sampler.gather(idx.support[b])
        n, q = idx.query.shape[1:]
        queries = sampler.gather(idx.query[b]).reshape(n * q, -1)
        labels = torch.arange(n).repeat_interleave(q)
        out.append((predict(support, queries) == labels).float().mean())
    return torch.stack(out)


def test_nearest_mean_is_exact_on_well_separated_clusters():
    split = synthetic_split(12, 15, 16, separation=1.0, noise=0.01, seed=0)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, 1, None)
    for classifier in (nearest_mean_cosine, nearest_mean_euclidean):
        result = evaluate_classifier(classifier, sampler, num_episodes=100, batch_size=50, seed=1)
        assert result.mean == 1.0


def test_cosine_nearest_mean_equals_direct_cosine_argmax():
    split = synthetic_split(12, 15, 16, noise=0.5, seed=1)
    sampler, idx = _episodes(split.embeddings, split.labels)

    def predict(support, queries):
        protos = support.mean(dim=1)
        cos = torch.nn.functional.cosine_similarity(queries[:, None], protos[None], dim=-1)
        return cos.argmax(dim=1)

    weights, bias = nearest_mean_cosine(sampler.gather(idx.support))
    got = score_queries(sampler, idx, weights, bias)
    assert torch.allclose(got, _direct_accuracy(sampler, idx, predict))
    assert 0.3 < got.mean() < 0.99  # a problem where the rule matters


def test_euclidean_nearest_mean_equals_argmin_distance_on_unnormalised_embeddings():
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(10).repeat_interleave(12)
    centers = torch.randn(10, 8, generator=gen) * torch.rand(10, 1, generator=gen) * 3
    emb = centers[labels] + torch.randn(120, 8, generator=gen)  # norms differ by class
    sampler, idx = _episodes(emb, labels, k=2)

    def predict(support, queries):
        return torch.cdist(queries, support.mean(dim=1)).argmin(dim=1)

    weights, bias = nearest_mean_euclidean(sampler.gather(idx.support))
    got = score_queries(sampler, idx, weights, bias)
    assert torch.allclose(got, _direct_accuracy(sampler, idx, predict))
    # the bias -||c||^2 matters here: dropping it changes the predictions
    assert not torch.allclose(got, score_queries(sampler, idx, weights, None))


def test_logistic_regression_loss_decreases_and_reaches_the_optimum():
    split = synthetic_split(10, 12, 16, noise=0.3, seed=3)
    sampler, idx = _episodes(split.embeddings, split.labels, k=5, batch=8)
    support = sampler.gather(idx.support).double()
    cfg = LogisticRegressionConfig(steps=400, l2=1.0)
    w, b, losses = fit_logistic_regression(support, cfg)
    assert losses.shape == (401, 8)
    assert bool((losses[1:] <= losses[:-1] + 1e-12).all())  # monotone: step 1/L
    assert bool((losses[-1] < 0.7 * losses[0]).all())
    # the gradient of the objective vanishes at the returned parameters
    w, b = w.clone().requires_grad_(True), b.clone().requires_grad_(True)
    x = support.reshape(8, 25, 16)
    labels = torch.arange(5).repeat_interleave(5).expand(8, 25)
    logits = x @ w.transpose(1, 2) + b[:, None, :]
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 5), labels.reshape(-1), reduction="sum"
    )
    gw, gb = torch.autograd.grad(ce + 0.5 * w.square().sum(), (w, b))
    assert gw.abs().max() < 1e-5 and gb.abs().max() < 1e-5


def test_logistic_regression_separates_separable_data():
    split = synthetic_split(12, 20, 16, separation=1.0, noise=0.05, seed=4)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, 1, None)
    classifier = logistic_regression(LogisticRegressionConfig(steps=50))
    result = evaluate_classifier(classifier, sampler, num_episodes=100, batch_size=50, seed=1)
    assert result.mean >= 0.99
    support, _, _ = sampler.sample(10, torch.Generator().manual_seed(0))
    w, b = classifier(support)
    fit = torch.einsum("bnkd,bmd->bnkm", support, w) + b[:, None, None, :]
    assert bool((fit.argmax(dim=-1) == torch.arange(5)[None, :, None]).all())  # support fitted


def test_registry_names_configs_and_fixed_classifiers():
    assert set(METHODS) == {
        "leo",
        "leo-deterministic",
        "leo-random-prior",
        "leo-no-finetune",
        "leo-finetune-only",
        "leo-pbt",
        "maml",
        "nearest-mean-cosine",
        "nearest-mean-euclidean",
        "logistic-regression",
    }
    base = make_config("mini-1shot", eval_inner_steps=6, num_steps=321)
    only = method_config("leo-finetune-only", base)
    assert only.test_inner_steps == 0 and only.inner_steps == 0
    assert dataclasses.replace(only, inner_steps=5, eval_inner_steps=6) == base
    no_ft = method_config("leo-no-finetune", base)
    assert no_ft.test_finetune_steps == 0 and no_ft.finetune_steps == 0
    assert method_config("leo-deterministic", base).deterministic
    assert method_config("leo-random-prior", base).random_prior
    maml = method_config("maml", base, inner_lr=0.5)
    assert isinstance(maml, MAMLConfig) and maml.num_steps == 321 and maml.inner_lr == 0.5
    assert not maml.learn_inner_lr  # Table 2's MAML: fixed inner step size
    assert method_config("nearest-mean-cosine", base) is None
    assert method_classifier("nearest-mean-euclidean") is nearest_mean_euclidean
    with pytest.raises(LeoInputError, match="needs a trained checkpoint"):
        method_classifier("leo")
    with pytest.raises(LeoInputError, match="unknown method 'protonet'"):
        method_classifier("protonet")


def _tiny_leo_problem():
    kw = dict(per_class=20, dim=8, noise=0.1)
    train = synthetic_split(12, split="train", seed=0, **kw)
    val = synthetic_split(6, split="val", seed=1, **kw)
    base = make_config(
        latent_dim=4,
        num_steps=6,
        validate_every=3,
        val_batches=1,
        val_batch_size=10,
        compile=False,
        eval_per_class_total=None,
    )
    return train, val, base


def test_registry_trains_a_leo_variant_and_scores_its_checkpoint(tmp_path):
    train, val, base = _tiny_leo_problem()
    ckpt = train_method("leo-random-prior", base, train, val, tmp_path)
    _, cfg, _ = load_checkpoint(ckpt)
    assert cfg == method_config("leo-random-prior", base) and cfg.random_prior
    assert train_method("nearest-mean-cosine", base, train, val, tmp_path / "none") is None
    sampler = EpisodeSampler(val.embeddings, val.labels, 5, 1, None)
    result = evaluate_classifier(
        method_classifier("leo-random-prior", ckpt), sampler, num_episodes=20, batch_size=10, seed=0
    )
    assert result.num_episodes == 20 and 0.0 <= result.mean <= 1.0


@pytest.mark.parametrize("name", ["leo-no-finetune", "leo-finetune-only"])
def test_registry_trains_the_zero_step_variants(tmp_path, name):
    train, val, base = _tiny_leo_problem()
    ckpt = train_method(name, base, train, val, tmp_path)
    assert load_checkpoint(ckpt)[1] == method_config(name, base)
