"""Episode sampling: distinct classes, disjoint support/query, seeds, refusals."""

import pytest
import torch

from leo.meta.episodes import EpisodeSampler
from leo.utils.errors import LeoInputError


def _split(counts):
    labels = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    emb = torch.arange(len(labels), dtype=torch.float32)[:, None].repeat(1, 3)  # row id in value
    return emb, labels


def test_classes_distinct_rows_disjoint_and_in_class():
    emb, labels = _split([7, 9, 8, 12, 10, 7])
    s = EpisodeSampler(emb, labels, num_classes=5, num_shots=2, num_queries=4)
    idx = s.indices(300, torch.Generator().manual_seed(0))
    assert idx.classes.shape == (300, 5) and idx.support.shape == (300, 5, 2)
    assert idx.query.shape == (300, 5, 4)
    for b in range(300):
        assert len(set(idx.classes[b].tolist())) == 5
        rows = torch.cat([idx.support[b], idx.query[b]], dim=1)  # (N, K+Q)
        assert len(set(rows.flatten().tolist())) == 5 * 6  # no row twice in an episode
        assert (labels[rows] == idx.classes[b][:, None]).all()  # every row of its class


def test_every_row_of_a_class_is_reachable_and_roughly_uniform():
    emb, labels = _split([5, 5, 30])
    s = EpisodeSampler(emb, labels, num_classes=3, num_shots=1, num_queries=2)
    idx = s.indices(3000, torch.Generator().manual_seed(1))
    big = idx.support[idx.classes == 2].flatten()
    counts = torch.bincount(big - 10, minlength=30)
    assert (counts > 0).all()  # rows past the smaller classes' sizes are drawn too
    assert counts.float().std() / counts.float().mean() < 0.3


def test_same_seed_same_episodes_other_seed_other_episodes():
    emb, labels = _split([10] * 8)
    s = EpisodeSampler(emb, labels, 5, 1, 3)
    a = s.indices(20, torch.Generator().manual_seed(3))
    b = s.indices(20, torch.Generator().manual_seed(3))
    c = s.indices(20, torch.Generator().manual_seed(4))
    assert torch.equal(a.query, b.query) and torch.equal(a.classes, b.classes)
    assert not torch.equal(a.query, c.query)


def test_gathered_embeddings_are_the_indexed_rows():
    emb, labels = _split([6] * 5)
    s = EpisodeSampler(emb, labels, 5, 2, 3)
    xs, xq, idx = s.sample(4, torch.Generator().manual_seed(0))
    assert torch.equal(xs[..., 0].long(), idx.support) and torch.equal(xq[..., 0].long(), idx.query)


def test_all_remaining_queries_up_to_the_per_class_total():
    emb, labels = _split([20] * 6)
    assert EpisodeSampler(emb, labels, 5, 1, None).q == 19
    assert EpisodeSampler(emb, labels, 5, 5, None, per_class_total=12).q == 7


def test_refuses_a_class_too_small_naming_it():
    emb, labels = _split([10, 10, 3, 10, 10])
    with pytest.raises(
        LeoInputError, match=r"class 'c2' has 3 examples, fewer than 1 support \+ 5"
    ):
        EpisodeSampler(emb, labels, 5, 1, 5, class_names=[f"c{i}" for i in range(5)])


def test_refuses_too_few_classes():
    emb, labels = _split([10, 10, 10])
    with pytest.raises(LeoInputError, match="3 classes, fewer than the 5"):
        EpisodeSampler(emb, labels, 5, 1, 5, split="val")
