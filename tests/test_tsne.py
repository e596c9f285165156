"""t-SNE: perplexity calibration, exact gradient, fused kernels, separation, seeds, scores."""

import math

import pytest
import torch

from leo.errors import LeoInputError
from leo.tsne import (
    conditional_affinities,
    joint_affinities,
    kl_divergence,
    kl_gradient,
    nearest_neighbour_agreement,
    silhouette,
    tsne,
)


def _clusters(num: int, per: int, dim: int, spread: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(num, dim, generator=gen)
    labels = torch.arange(num).repeat_interleave(per)
    return centres[labels] + spread * torch.randn(num * per, dim, generator=gen), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_conditional_row_has_the_target_perplexity(dtype):
    x, _ = _clusters(4, 30, 6, 1.0)
    x = (1000.0 * x).to(dtype)  # far apart: exp(-beta d) would underflow without the shift
    p, beta = conditional_affinities(x, 15.0, block_rows=17)  # blocks of uneven size
    entropy = -torch.xlogy(p, p).sum(dim=1)
    assert torch.allclose(entropy, torch.full_like(entropy, math.log(15.0)), atol=1e-4)
    assert torch.allclose(p.sum(dim=1), torch.ones(120, dtype=dtype), atol=1e-5)
    assert p.diagonal().abs().max() == 0.0 and (beta > 0).all()
    joint = joint_affinities(x, 15.0, block_rows=17)
    assert torch.equal(joint, joint.T) and math.isclose(float(joint.sum()), 1.0, rel_tol=1e-5)
    assert torch.allclose(joint, (p + p.T) / 240, atol=1e-9)


def test_perplexity_must_be_below_n_minus_one():
    with pytest.raises(LeoInputError, match="perplexity"):
        conditional_affinities(torch.randn(10, 3), 9.0)


def _objective(p, y, exaggeration):
    """-a sum p log w + log Z, written plainly: KL(P||Q) up to a constant when a = 1."""
    w = 1.0 / (1.0 + (y[:, None, :] - y[None, :, :]).square().sum(-1))  # w_ii = 1, p_ii = 0
    off_diagonal = 1 - torch.eye(len(y), dtype=y.dtype)
    return -exaggeration * (p * torch.log(w)).sum() + torch.log((w * off_diagonal).sum())


@pytest.mark.parametrize("exaggeration", [1.0, 12.0])
def test_kl_gradient_equals_autograd(exaggeration):
    x, _ = _clusters(3, 14, 5, 2.0)
    p = joint_affinities(x.double(), 8.0)
    y = torch.randn(42, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y.requires_grad_(True)
    (expected,) = torch.autograd.grad(_objective(p, y, exaggeration), y)
    got = kl_gradient(p, y.detach(), exaggeration=exaggeration, block_rows=5)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    if exaggeration == 1.0:  # and the KL itself: sum p log p + the objective
        kl = float(torch.xlogy(p, p).sum() + _objective(p, y.detach(), 1.0))
        assert math.isclose(kl_divergence(p, y.detach(), block_rows=5), kl, rel_tol=1e-10)


def test_compiled_kernels_equal_the_eager_blocks():
    x, _ = _clusters(4, 50, 8, 1.0)
    eager = joint_affinities(x, 20.0)
    fused = joint_affinities(x, 20.0, compiled=True)
    assert torch.allclose(fused, eager, rtol=1e-4, atol=1e-9)
    y = torch.randn(200, 2, generator=torch.Generator().manual_seed(2))
    g_eager = kl_gradient(eager, y, exaggeration=12.0)
    g_fused = kl_gradient(eager, y, exaggeration=12.0, compiled=True)
    assert torch.allclose(g_fused, g_eager, rtol=1e-4, atol=1e-5 * float(g_eager.abs().max()))


def test_separated_clusters_stay_separated_in_the_map():
    x, labels = _clusters(6, 40, 10, 1.0)
    result = tsne(x, perplexity=20.0, iterations=400, compile=False)
    assert result.embedding.shape == (240, 2) and not result.compiled
    assert nearest_neighbour_agreement(result.embedding, labels) == 1.0
    assert silhouette(result.embedding, labels) > 0.7
    assert abs(float(result.embedding.mean(dim=0).abs().max())) < 1e-3  # re-centred
    assert 0.0 < result.kl_divergence < 1.0


def test_same_seed_same_map_other_seed_other_map():
    x, _ = _clusters(3, 20, 5, 1.0)
    run = dict(perplexity=10.0, iterations=60, init="random", compile=False)
    a, b = tsne(x, seed=3, **run), tsne(x, seed=3, **run)
    c = tsne(x, seed=4, **run)
    assert torch.equal(a.embedding, b.embedding)
    assert not torch.allclose(a.embedding, c.embedding, atol=1e-3)
    pca = [tsne(x, init="pca", perplexity=10.0, iterations=60, compile=False) for _ in range(2)]
    assert torch.equal(pca[0].embedding, pca[1].embedding)


def test_scores_by_hand():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    grouped = torch.tensor([0, 0, 1, 1])
    # a = 1 for every point; b = 10.5, 9.5, 9.5, 10.5: s = (b - a) / b.
    expected = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert math.isclose(silhouette(x, grouped, block_rows=3), expected, rel_tol=1e-6)
    assert nearest_neighbour_agreement(x, grouped, block_rows=3) == 1.0
    assert nearest_neighbour_agreement(x, torch.tensor([0, 1, 0, 1])) == 0.0
    # a singleton label scores 0: point 3 alone; points 0-2: a = 5.5, 5, 9.5 vs b = 11, 10, 1.
    single = torch.tensor([0, 0, 0, 1])
    by_hand = [(11 - 5.5) / 11, (10 - 5.0) / 10, (1 - 9.5) / 9.5, 0.0]
    assert math.isclose(silhouette(x, single), sum(by_hand) / 4, rel_tol=1e-6)
