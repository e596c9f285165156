"""Figure 2: the codes are those of per-episode adaptation; the openTSNE map (separation,
seeds, threads, its KL); the separation scores by hand; the PNG and its summary."""

import json
import math
import os

import matplotlib.image
import numpy as np
import openTSNE
import pytest
import torch

from leo.comparison.figures import (
    _class_colours,
    figure2,
    latent_codes,
    nearest_neighbour_agreement,
    silhouette,
    tsne_map,
)
from leo.core.config import make_config
from leo.core.model import adapt, init_params
from leo.data.synthetic import synthetic_split
from leo.meta.evaluate import eval_sampler
from leo.utils.errors import LeoInputError

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(dim: int, **overrides):
    cfg = make_config(compile=False, latent_dim=8, inner_steps=3, finetune_steps=2, **overrides)
    return init_params(cfg, dim, torch.Generator().manual_seed(0)), cfg


def _clusters(num: int, per: int, dim: int, spread: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = 10.0 * rng.standard_normal((num, dim))
    labels = np.repeat(np.arange(num), per)
    return centres[labels] + spread * rng.standard_normal((num * per, dim)), labels


def test_latent_codes_are_those_of_each_episode_adapted_alone():
    split = synthetic_split(9, 10, 12, noise=0.3, seed=3, split="val")
    params, cfg = _model(12)
    z0, z1, classes = latent_codes(params, cfg, split, episodes=7, seed=5, shots=2, batch_size=3)
    assert z0.shape == z1.shape == (35, 8) and classes.shape == (35,)
    sampler = eval_sampler(split, make_config(compile=False, num_shots=2))
    gen = torch.Generator().manual_seed(5)  # the same seeded episodes, in the same batches
    batches = [sampler.indices(b, gen) for b in (3, 3, 1)]
    support = torch.cat([idx.support for idx in batches])
    episode_classes = torch.cat([idx.classes for idx in batches])
    for e in range(7):
        out = adapt(params, sampler.gather(support[e]), cfg, training=False)
        rows = slice(5 * e, 5 * e + 5)
        assert torch.allclose(z0[rows], out["z_init"].mean(dim=1), atol=1e-5)
        assert torch.allclose(z1[rows], out["z_adapted"].mean(dim=1), atol=1e-5)
        assert torch.equal(classes[rows], episode_classes[e])
    assert not torch.allclose(z0, z1, atol=1e-3)  # adaptation moved the codes


def test_separated_clusters_stay_separated_in_the_map():
    x, labels = _clusters(6, 40, 10, 1.0)
    result = tsne_map(x, perplexity=20.0, iterations=400, seed=0)
    assert result.embedding.shape == (240, 2) and np.isfinite(result.embedding).all()
    assert (result.iterations, result.exaggeration_iterations) == (400, 100)
    assert nearest_neighbour_agreement(result.embedding, labels) == 1.0
    assert silhouette(result.embedding, labels) > 0.7


def _exact_kl(p, y: np.ndarray) -> float:
    """KL(P || Q) with every pair's Student-t weight: sum p log(p / (w / Z))."""
    p = p.tocoo()
    w = 1.0 / (1.0 + ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1))
    z = w.sum() - len(y)  # without the diagonal w_ii = 1
    return float(np.sum(p.data * np.log(p.data * z / w[p.row, p.col])))


def test_reported_kl_is_that_of_the_final_map():
    x, _ = _clusters(4, 50, 8, 2.0, seed=1)
    result = tsne_map(x, perplexity=15.0, iterations=300, seed=2)
    # the same affinities, recomputed (exact neighbours: nothing random in them)
    p = openTSNE.affinity.PerplexityBasedNN(x, perplexity=15.0, method="exact").P
    assert math.isclose(result.kl_divergence, _exact_kl(p, result.embedding), rel_tol=0.03)
    assert result.perplexity == 15.0 and 0.0 < result.kl_divergence < 2.0


def test_same_seed_same_map_whatever_the_threads_other_seed_other_map():
    x, _ = _clusters(3, 40, 5, 1.0)
    run = dict(perplexity=10.0, iterations=120)
    a = tsne_map(x, seed=3, **run).embedding
    b = tsne_map(x, seed=3, threads=2, **run).embedding
    c = tsne_map(x, seed=4, **run).embedding
    assert np.array_equal(a, b)
    assert not np.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize(
    ("points", "perplexity", "iterations"), [(12, 4.0, 10), (3, 0.5, 10), (50, 5.0, 0)]
)
def test_bad_tsne_arguments_are_one_line_errors(points, perplexity, iterations):
    x = np.random.default_rng(0).standard_normal((points, 3))
    with pytest.raises(LeoInputError, match="t-SNE") as err:
        tsne_map(x, perplexity=perplexity, iterations=iterations)
    assert "\n" not in str(err.value)


def test_scores_by_hand():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    grouped = np.array([0, 0, 1, 1])
    # a = 1 for every point; b = 10.5, 9.5, 9.5, 10.5: s = (b - a) / b.
    expected = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert math.isclose(silhouette(x, grouped), expected, rel_tol=1e-12)
    assert nearest_neighbour_agreement(x, grouped) == 1.0
    assert nearest_neighbour_agreement(x, np.array([0, 1, 0, 1])) == 0.0
    # a singleton label scores 0: point 3 alone; points 0-2: a = 5.5, 5, 9.5 vs b = 11, 10, 1.
    single = np.array([0, 0, 0, 1])
    by_hand = [(11 - 5.5) / 11, (10 - 5.0) / 10, (1 - 9.5) / 9.5, 0.0]
    assert math.isclose(silhouette(x, single), sum(by_hand) / 4, rel_tol=1e-12)
    # undefined: one label, or every point its own
    assert silhouette(x, np.zeros(4)) is None and silhouette(x, np.arange(4)) is None
    # a duplicate is a point's nearest other point, and the point itself never is
    dup = np.array([[0.0], [0.0], [5.0]])
    assert nearest_neighbour_agreement(dup, np.array([0, 0, 1])) == pytest.approx(2 / 3)


def test_figure2_writes_a_png_of_the_requested_size(tmp_path):
    split = synthetic_split(8, 12, 16, noise=0.2, seed=1, split="val")
    params, cfg = _model(16)
    out = tmp_path / "fig" / "figure2.png"
    summary = figure2(
        params, cfg, split, out, episodes=40, seed=0, iterations=300, figsize=(10, 5), dpi=80
    )
    image = matplotlib.image.imread(out)
    assert image.shape[:2] == (400, 800)  # rows = 5 in * 80 dpi, columns = 10 in * 80 dpi
    assert image[..., :3].std() > 0.05  # something drawn, not a blank canvas
    assert sorted(p.name for p in out.parent.iterdir()) == ["figure2.png"]  # no temp files
    assert set(summary) == {
        "png",
        "episodes",
        "way",
        "shots",
        "codes",
        "classes",
        "latent_dim",
        "mean_shift",
        "mean_norm_before",
        "mean_norm_after",
        "nn_class_agreement_before",
        "nn_class_agreement_after",
        "silhouette_before",
        "silhouette_after",
        "tsne_kind_agreement",
        "tsne_kl",
        "tsne_perplexity",
        "tsne_iterations",
        "tsne_exaggeration_iterations",
        "tsne_method",
        "tsne_threads",
        "tsne_seconds",
        "seed",
        "seconds",
    }
    json.dumps(summary, allow_nan=False)  # JSON-ready as it is
    assert summary["codes"] == 200 and summary["classes"] == 8 and summary["way"] == 5
    assert summary["tsne_perplexity"] == 30.0 and summary["tsne_iterations"] == 300
    assert summary["tsne_exaggeration_iterations"] == 75 and summary["tsne_threads"] == (
        os.cpu_count() or 1
    )
    assert summary["tsne_method"].startswith(f"openTSNE {openTSNE.__version__}")
    z0, z1, classes = (
        t.double().numpy() for t in latent_codes(params, cfg, split, episodes=40, seed=0)
    )
    assert summary["mean_shift"] == pytest.approx(np.linalg.norm(z1 - z0, axis=1).mean())
    assert summary["mean_norm_after"] == pytest.approx(np.linalg.norm(z1, axis=1).mean())
    for key in ("nn_class_agreement_before", "nn_class_agreement_after", "tsne_kind_agreement"):
        assert 0.0 <= summary[key] <= 1.0
    assert summary["nn_class_agreement_after"] == nearest_neighbour_agreement(z1, classes)
    for key in ("silhouette_before", "silhouette_after"):
        assert -1.0 <= summary[key] <= 1.0
    assert np.isfinite(summary["tsne_kl"]) and summary["seconds"] >= summary["tsne_seconds"]


def test_class_colours_are_distinct_beyond_the_named_colormaps():
    for num in (5, 16, 64):
        colours = _class_colours(num, seed=0)
        assert len(np.unique(np.round(colours, 6), axis=0)) == num
