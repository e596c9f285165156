"""MAML: zero steps is W0, inner gradients in closed form, exact second-order meta-gradient,
learns an easy problem, resumes exactly after a kill (log included), refuses a state made on
other data, checkpoints round-trip through the method registry."""

import time

import pytest
import torch
import torch.nn.functional as F

from leo.comparison.maml import (
    batch_maml_loss,
    init_maml_params,
    load_maml_checkpoint,
    make_maml_config,
    maml_adapt,
    maml_classifier,
    maml_train,
    support_grads,
)
from leo.comparison.methods import method_classifier, train_method
from leo.core.config import make_config
from leo.data.synthetic import synthetic_split
from leo.meta.evaluate import eval_sampler, evaluate_classifier, score_queries
from leo.meta.loop import data_sha256
from leo.utils.atomic import write_torch
from leo.utils.errors import LeoInputError
from leo.utils.live import METRICS_DIR, open_live


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: extra threads only add overhead on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _double(params):
    return {k: v.double().requires_grad_(True) for k, v in params.items()}


def test_zero_steps_is_the_initial_classifier_exactly():
    cfg = make_maml_config(
        inner_steps=3, eval_inner_steps=0, compile=False, eval_per_class_total=None
    )
    split = synthetic_split(10, 12, 8, noise=0.4, seed=0)
    params = init_maml_params(cfg, 8, torch.Generator().manual_seed(0))
    params["b0"] = torch.randn(5, generator=torch.Generator().manual_seed(1))
    sampler = eval_sampler(split, cfg)
    idx = sampler.indices(30, torch.Generator().manual_seed(2))
    w, b = maml_classifier(params, cfg)(sampler.gather(idx.support))
    assert torch.equal(w, params["W0"].expand(30, 5, 8))
    assert torch.equal(b, params["b0"].expand(30, 5))
    direct = score_queries(sampler, idx, params["W0"].expand(30, 5, 8), params["b0"].expand(30, 5))
    assert torch.equal(score_queries(sampler, idx, w, b), direct)
    # with steps the support changes the classifier
    stepped = make_maml_config(eval_inner_steps=1, compile=False)
    assert not torch.equal(maml_classifier(params, stepped)(sampler.gather(idx.support))[0], w)


def test_closed_form_support_gradients_equal_autograd():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 3, 6, generator=gen, dtype=torch.float64)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(3)
    loss = F.cross_entropy(x.reshape(12, 6) @ w.T + b, labels, reduction="sum")
    gw, gb = torch.autograd.grad(loss, (w, b))
    cw, cb = support_grads(x, w, b)
    assert torch.allclose(cw, gw, atol=1e-12) and torch.allclose(cb, gb, atol=1e-12)


def _finite_difference(f, params, eps=1e-6):
    out = {}
    for name, p in params.items():
        g = torch.zeros_like(p)
        flat = p.detach().reshape(-1)
        for i in range(flat.numel()):
            plus = {k: v.detach().clone() for k, v in params.items()}
            minus = {k: v.detach().clone() for k, v in params.items()}
            plus[name].view(-1)[i] += eps
            minus[name].view(-1)[i] -= eps
            g.view(-1)[i] = (f(plus) - f(minus)) / (2 * eps)
        out[name] = g
    return out


def test_second_order_meta_gradient_matches_finite_differences():
    cfg = make_maml_config(
        num_classes=3, num_shots=2, inner_steps=2, inner_lr=0.7, learn_inner_lr=True, compile=False
    )
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(2, 3, 2, 4, generator=gen, dtype=torch.float64)
    xq = torch.randn(2, 3, 2, 4, generator=gen, dtype=torch.float64)
    params = _double(init_maml_params(cfg, 4, gen))
    params["b0"] = torch.randn(3, generator=gen, dtype=torch.float64).requires_grad_(True)

    def loss(p, c=cfg):
        return batch_maml_loss(p, xs, xq, c)[0]

    names = list(params)
    grads = dict(
        zip(names, torch.autograd.grad(loss(params), [params[k] for k in names]), strict=True)
    )
    numeric = _finite_difference(loss, params)
    for k in names:
        assert torch.allclose(grads[k], numeric[k], atol=1e-8, rtol=1e-6), k
    # the second-order terms matter: the first-order shortcut gives another W0 gradient
    fo = make_maml_config(**{**cfg.to_dict(), "first_order": True})
    g_fo = torch.autograd.grad(loss(params, fo), params["W0"])[0]
    assert (g_fo - grads["W0"]).abs().max() > 1e-3


def test_fixed_inner_lr_is_not_a_parameter_and_adapt_uses_it():
    cfg = make_maml_config(num_classes=3, inner_lr=0.5, use_bias=False)
    params = init_maml_params(cfg, 4, torch.Generator().manual_seed(5))
    assert set(params) == {"W0"}
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(6))
    w, b = maml_adapt(params, x, cfg, steps=1)
    assert b is None
    assert torch.allclose(w, params["W0"] - 0.5 * support_grads(x, params["W0"], None)[0])


def _splits(dim=16, noise=0.1):
    kw = dict(per_class=20, dim=dim, noise=noise)
    return (
        synthetic_split(30, split="train", seed=0, **kw),
        synthetic_split(10, split="val", seed=1, **kw),
        synthetic_split(10, split="test", seed=2, **kw),
    )


def test_maml_learns_an_easy_problem_within_seconds(tmp_path):
    train, val, test = _splits()
    base = make_config(
        num_steps=120,
        validate_every=40,
        val_batches=1,
        val_batch_size=50,
        compile=False,
        eval_per_class_total=None,
    )
    # a small step from a random W0 is near chance; meta-learning must fix W0 and alpha
    maml = dict(inner_steps=1, inner_lr=0.1, learn_inner_lr=True, outer_lr=1e-2)
    start = time.perf_counter()
    ckpt = train_method("maml", base, train, val, tmp_path, **maml)
    params, cfg, meta = load_maml_checkpoint(ckpt)
    sampler = eval_sampler(test, cfg)
    before = init_maml_params(cfg, 16, torch.Generator().manual_seed(cfg.seed))
    acc0 = evaluate_classifier(
        maml_classifier(before, cfg), sampler, num_episodes=400, batch_size=200, seed=1
    ).mean
    acc = evaluate_classifier(
        method_classifier("maml", ckpt), sampler, num_episodes=400, batch_size=200, seed=1
    ).mean
    assert acc0 < 0.5 and acc >= 0.90, (acc0, acc)
    assert float(params["inner_lr"]) > 0.1  # the step size was learned upwards
    assert meta["step"] in (40, 80, 120) and (tmp_path / "state.pt").is_file()
    assert meta["data_sha256"] == data_sha256(train, val)
    assert time.perf_counter() - start < 45


def _maml_cfg(**kw):
    base = dict(
        num_steps=30,
        validate_every=10,
        val_batches=1,
        val_batch_size=20,
        inner_steps=2,
        learn_inner_lr=True,
        compile=False,
        eval_per_class_total=None,
    )
    return make_maml_config(**{**base, **kw})


def _tsv_files(live_dir):
    root = live_dir / METRICS_DIR
    return {p.name: p.read_bytes() for p in sorted(root.glob("*.tsv"))}


def test_a_killed_then_resumed_maml_run_equals_an_uninterrupted_one(tmp_path):
    train, val, _ = _splits()
    cfg = _maml_cfg()
    with open_live(tmp_path / "log_a") as live:
        straight = maml_train(cfg, train, val, tmp_path / "a", progress=False, live=live)
    with open_live(tmp_path / "log_b") as live:
        killed = maml_train(
            cfg, train, val, tmp_path / "b", progress=False, stop_after=15, live=live
        )
    assert killed.steps == 15 and len(killed.history) == 1
    with open_live(tmp_path / "log_b") as live:  # a fresh log, as after DVC removed the outs
        resumed = maml_train(cfg, train, val, tmp_path / "b", progress=False, live=live)
    assert resumed.steps == straight.steps == 30
    assert resumed.history == straight.history and len(straight.history) == 3
    assert list(straight.history[0])[-1] == "inner_lr"
    a = torch.load(tmp_path / "a/state.pt", weights_only=True)
    b = torch.load(tmp_path / "b/state.pt", weights_only=True)
    assert all(torch.equal(a["params"][k], b["params"][k]) for k in a["params"])
    assert all(torch.equal(x, y) for x, y in zip(a["generators"], b["generators"], strict=True))
    # Adam moments too: the next step of either run would be the same
    assert all(torch.equal(a["adam"]["m"][k], b["adam"]["m"][k]) for k in a["adam"]["m"])
    assert (tmp_path / "a/best.pt").read_bytes() == (tmp_path / "b/best.pt").read_bytes()
    files = _tsv_files(tmp_path / "log_a")
    assert "inner_lr.tsv" in files and files == _tsv_files(tmp_path / "log_b")
    # a finished run returns its result at once, the same
    again = maml_train(cfg, train, val, tmp_path / "b", progress=False)
    assert again.history == straight.history and again.best_step == straight.best_step


def test_a_maml_state_made_on_other_data_is_refused(tmp_path):
    train, val, _ = _splits()
    other = synthetic_split(30, split="train", seed=7, per_class=20, dim=16, noise=0.1)
    cfg = _maml_cfg(num_steps=10)
    maml_train(cfg, train, val, tmp_path, progress=False)
    with pytest.raises(LeoInputError, match=r"state.pt: saved by a run on other data"):
        maml_train(cfg, other, val, tmp_path, progress=False)
    with pytest.raises(LeoInputError, match=r"state.pt: saved by a different config"):
        maml_train(_maml_cfg(num_steps=10, inner_steps=1), train, val, tmp_path, progress=False)


def test_a_leo_checkpoint_is_not_read_as_maml(tmp_path):
    write_torch(tmp_path / "best.pt", {"params": {}, "config": make_config().to_dict()})
    with pytest.raises(LeoInputError, match="not a MAML checkpoint"):
        load_maml_checkpoint(tmp_path / "best.pt")
