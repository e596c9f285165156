"""Figure 2: the codes are those of per-episode adaptation; the PNG and its summary."""

import matplotlib.image
import numpy as np
import torch

from leo.config import make_config
from leo.evaluate import eval_sampler
from leo.figures import _class_colours, figure2, latent_codes
from leo.model import adapt, init_params
from leo.synthetic import synthetic_split


def _model(dim: int, **overrides):
    cfg = make_config(compile=False, latent_dim=8, inner_steps=3, finetune_steps=2, **overrides)
    return init_params(cfg, dim, torch.Generator().manual_seed(0)), cfg


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
    assert summary["codes"] == 200 and summary["classes"] == 8 and summary["way"] == 5
    assert summary["mean_shift"] > 0 and summary["tsne_perplexity"] == 30.0
    for key in ("nn_class_agreement_before", "nn_class_agreement_after", "tsne_kind_agreement"):
        assert 0.0 <= summary[key] <= 1.0
    for key in ("silhouette_before", "silhouette_after"):
        assert -1.0 <= summary[key] <= 1.0
    assert np.isfinite(summary["tsne_kl"]) and summary["tsne_iterations"] == 300


def test_class_colours_are_distinct_beyond_the_named_colormaps():
    for num in (5, 16, 64):
        colours = _class_colours(num, seed=0)
        assert len(np.unique(np.round(colours, 6), axis=0)) == num
