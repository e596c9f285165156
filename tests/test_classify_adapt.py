"""LEO's evaluation-mode adaptation for unequal shots per class (leo.classify.adapt), in float64:

- equal K: the same classifier as the pipeline's evaluation (``BatchAdapter``: the explicit
  batched form for the linear model, vmap over ``leo.core.model.adapt`` otherwise);
- unequal K: the same as a plain version that keeps one latent and one weight vector per shot,
  loops over every ordered pair for the relation network and takes every gradient by autograd.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from plain_leo import mlp_on_vector

from leo.classify.adapt import adapt_ragged, check_params
from leo.core.config import make_config
from leo.core.model import init_params
from leo.core.step import BatchAdapter

TOL = 1e-10
D = 24

CONFIGS = {
    "reference": {},
    "paper-steps": {"eval_inner_steps": 6, "eval_finetune_steps": 3, "finetune_lr_init": 1.0},
    "random-prior": {"random_prior": True},
    "no-finetune": {"finetune_steps": 0},
    "hidden": {"hidden_dim": 16, "latent_dim": 8},
}


def setup(name: str, seed: int = 0):
    cfg = make_config(latent_dim=CONFIGS[name].get("latent_dim", 6), compile=False, **{
        k: v for k, v in CONFIGS[name].items() if k != "latent_dim"
    })  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    params = {k: v.double() for k, v in init_params(cfg, D, gen).items()}
    # step sizes randomised so that each entry matters
    params["inner_lr"] = 1.0 + 0.3 * torch.randn(cfg.latent_dim, generator=gen, dtype=torch.float64)
    params["finetune_lr"] = 0.5 + 0.2 * torch.rand(D, generator=gen, dtype=torch.float64)
    return cfg, params, gen


@pytest.mark.parametrize("name", list(CONFIGS))
def test_equal_shots_give_the_pipeline_evaluation(name, one_thread):
    cfg, params, gen = setup(name)
    n, k = 5, 3
    xs = F.normalize(torch.randn(2, n, k, D, generator=gen, dtype=torch.float64), dim=-1)
    expected = BatchAdapter(cfg)(params, xs)
    labels = torch.arange(n).repeat_interleave(k)
    for b in range(2):
        out = adapt_ragged(params, xs[b].reshape(n * k, D), labels, n, cfg)
        torch.testing.assert_close(out["w_bar"], expected["w_bar"][b], rtol=0, atol=TOL)
        torch.testing.assert_close(
            out["z_adapted"], expected["z_adapted"][b, :, 0], rtol=0, atol=TOL
        )


def plain_ragged(params, x, labels, n, cfg):
    """One latent and one weight vector per shot; every pair looped; autograd gradients."""
    zdim = cfg.latent_dim
    rows = [[i for i in range(len(x)) if labels[i] == c] for c in range(n)]

    def relation(ci, cj):
        return mlp_on_vector(params, "relation", torch.cat([ci, cj]))

    if cfg.random_prior:
        mus = [x.new_zeros(zdim) for _ in range(n)]
    else:
        codes = [mlp_on_vector(params, "encoder", x[i]) for i in range(len(x))]
        mus = []
        for c in range(n):
            per_row = [
                torch.stack([relation(codes[i], codes[j]) for j in range(len(x))]).mean(0)
                for i in rows[c]
            ]
            mus.append(torch.stack(per_row).mean(0)[:zdim])
    z = [mus[c].expand(len(rows[c]), zdim).clone() for c in range(n)]  # (K_c, Z) each

    def decode_mean(v):
        return mlp_on_vector(params, "decoder", v)[:D]  # the mean half

    def loss_of_weights(ws):  # ws[c]: (K_c, D); a logit is the mean over the class's shots
        logits = torch.stack([(x @ w.T).mean(dim=1) for w in ws], dim=1)  # (M, N)
        return F.cross_entropy(logits, labels, reduction="sum")

    def weights_of(zs):
        return [torch.stack([decode_mean(zk) for zk in zc]) for zc in zs]

    for _ in range(cfg.test_inner_steps):
        zs = [zc.detach().requires_grad_(True) for zc in z]
        grads = torch.autograd.grad(loss_of_weights(weights_of(zs)), zs)
        z = [zc.detach() - params["inner_lr"] * g for zc, g in zip(zs, grads, strict=True)]
    w = [wc.detach() for wc in weights_of(z)]
    for _ in range(cfg.test_finetune_steps):
        ws = [wc.requires_grad_(True) for wc in w]
        grads = torch.autograd.grad(loss_of_weights(ws), ws)
        w = [(wc - params["finetune_lr"] * g).detach() for wc, g in zip(ws, grads, strict=True)]
    return torch.stack([wc.mean(0) for wc in w]), torch.stack([zc[0] for zc in z])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unequal_shots_match_the_plain_per_shot_version(name, one_thread):
    cfg, params, gen = setup(name, seed=1)
    shots = [1, 4, 2, 3]
    labels = torch.tensor([c for c, k in enumerate(shots) for _ in range(k)])
    labels = labels[torch.randperm(len(labels), generator=gen)]  # rows in any order
    x = F.normalize(torch.randn(len(labels), D, generator=gen, dtype=torch.float64), dim=-1)
    out = adapt_ragged(params, x, labels, len(shots), cfg)
    w, z = plain_ragged(params, x, labels, len(shots), cfg)
    torch.testing.assert_close(out["w_bar"], w, rtol=0, atol=TOL)
    torch.testing.assert_close(out["z_adapted"], z, rtol=0, atol=TOL)
    # and the shots do matter: a class's weights move when one of its shots is dropped
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[(labels == 1).nonzero()[0]] = False
    fewer = adapt_ragged(params, x[keep], labels[keep], len(shots), cfg)["w_bar"]
    assert (fewer[1] - out["w_bar"][1]).abs().max() > 1e-4


def test_row_order_does_not_matter(one_thread):
    cfg, params, gen = setup("paper-steps", seed=2)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    x = F.normalize(torch.randn(7, D, generator=gen, dtype=torch.float64), dim=-1)
    perm = torch.randperm(7, generator=gen)
    a = adapt_ragged(params, x, labels, 3, cfg)["w_bar"]
    b = adapt_ragged(params, x[perm], labels[perm], 3, cfg)["w_bar"]
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)


def test_a_class_without_rows_is_an_error():
    cfg, params, _ = setup("reference")
    x = F.normalize(torch.randn(3, D, dtype=torch.float64), dim=-1)
    with pytest.raises(ValueError, match="class 1 has no support example"):
        adapt_ragged(params, x, torch.tensor([0, 2, 2]), 3, cfg)


def test_check_params_names_missing_and_misshapen_parameters():
    cfg, params, _ = setup("reference")
    assert check_params(params, cfg, D) == []
    assert check_params(params, cfg, D + 1)[0].startswith("'encoder.0' has shape (24, 6)")
    del params["relation.2"]
    assert "missing parameter 'relation.2'" in check_params(params, cfg, D)
