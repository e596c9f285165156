"""float32 against float64: the std formula without cancellation, and the meta-gradient.

std = exp(raw) - 1 (the latents' offset is 0) loses float32's digits near raw = 0 (exp(raw)
rounds to a spacing of 1.2e-7 around 1, then 1 is subtracted); expm1(raw) is the same
function without that loss (docs/model.md, point 3; leo.core.model.shifted_expm1). These
tests feed exactly representable float32 inputs to both precisions, so every difference is
rounding inside the computation.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from leo.core import explicit
from leo.core.config import make_config
from leo.core.model import STD_FLOOR, gaussian_std, gaussian_std_parts, init_params
from leo.core.noise import draw_noise
from leo.core.optim import Adam
from leo.core.step import MetaStep
from leo.data.synthetic import synthetic_split
from leo.meta.episodes import EpisodeSampler

pytestmark = pytest.mark.usefixtures("one_thread")

RAW = torch.cat(
    [
        -torch.logspace(-1, -8, 30),
        torch.logspace(-8, 0.5, 60),  # from 1e-8 (std ~ raw) to 3.2
    ]
).to(torch.float32)


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b).abs() / b.abs()


@pytest.mark.parametrize(
    ("offset", "tolerance"),
    [
        (0.0, 1e-6),  # the latents: expm1, to float32's precision however close to 0
        ((2.0 / (5 + 640)) ** 0.5, 2e-6),  # the weights: the offset keeps the std from 0
    ],
)
def test_std_and_its_slope_keep_float32_precision_near_raw_zero(offset, tolerance):
    kept = (torch.expm1(RAW.double()) + offset) >= STD_FLOOR
    exact = (torch.expm1(RAW.double()) + offset).clamp_min(STD_FLOOR)
    for std in (
        gaussian_std(RAW, offset),
        gaussian_std_parts(RAW, offset)[0],
        explicit._std_and_slope(RAW, offset)[0],
    ):
        assert relative(std, exact)[kept].max() < tolerance
    slope = explicit._std_and_slope(RAW, offset)[1]
    assert relative(slope, torch.exp(RAW.double()) * kept)[kept].max() < 1e-6
    if offset == 0.0:  # the subtraction form, for contrast: most digits gone near 0
        subtracted = (torch.exp(RAW) - 1.0).clamp_min(STD_FLOOR)
        small = kept & (RAW.abs() < 1e-3)
        assert relative(subtracted, exact)[small].max() > 1e-2


def _batch(cfg, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    n, k, q = cfg.num_classes, cfg.num_shots, cfg.num_queries
    xs = F.normalize(torch.randn(12, n, k, dim, generator=gen), dim=-1)
    xq = F.normalize(torch.randn(12, n, q, dim, generator=gen), dim=-1)
    return xs, xq, draw_noise(cfg, 12, q, dim, gen)


def _grad_error(params, xs, xq, noise, cfg) -> dict[str, float]:
    """||g32 - g64|| / ||g64|| per parameter, the float64 pass on the same float32 inputs."""
    f64 = lambda d: {a: b.detach().double() for a, b in d.items()}  # noqa: E731
    _, _, g64 = explicit.loss_and_grads(f64(params), xs.double(), xq.double(), f64(noise), cfg)
    _, _, g32 = explicit.loss_and_grads(params, xs, xq, noise, cfg)
    return {k: float((g32[k].double() - g64[k]).norm() / g64[k].norm()) for k in g64}


@pytest.mark.parametrize("preset", ["mini-1shot", "mini-5shot"])
def test_meta_gradient_float32_matches_float64_with_sampling(preset):
    """With sampling on every path, after the latent stds have left the floor."""
    dim = 64
    cfg = make_config(preset, compile=False)
    split = synthetic_split(30, 30, dim, noise=0.3, seed=1)
    sampler = EpisodeSampler(split.embeddings, split.labels, 5, cfg.num_shots, 15)
    gen = torch.Generator().manual_seed(0)
    params = init_params(cfg, dim, torch.Generator().manual_seed(0))
    for p in params.values():
        p.requires_grad_(True)
    opt, step = Adam(params, 1e-3), MetaStep(cfg)
    for _ in range(100):
        xs, xq, _ = sampler.sample(12, gen)
        step(params, opt, xs, xq, draw_noise(cfg, 12, 15, dim, gen))
    xs, xq, _ = sampler.sample(12, gen)
    errors = _grad_error(params, xs, xq, draw_noise(cfg, 12, 15, dim, gen), cfg)
    assert max(errors.values()) < 1e-4, errors


@pytest.mark.parametrize("kw", [{"kl_weight": 0.0}, {"deterministic": True}])
def test_meta_gradient_float32_matches_float64_from_initialisation(kw):
    """Without the KL's -log(std) (whose slope 1/std is ill-conditioned while a std sits just
    above 0, as at initialisation: docs/findings.md), every path agrees from step 0."""
    cfg = dataclasses.replace(make_config("mini-1shot", compile=False), **kw)
    params = init_params(cfg, 640, torch.Generator().manual_seed(3))
    errors = _grad_error(params, *_batch(cfg, 640, 4), cfg)
    assert max(errors.values()) < 1e-5, errors
