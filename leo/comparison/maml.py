"""MAML on the frozen embeddings: the paper's "MAML (our feature embedding)" (Table 2).

The model is one softmax classifier, logit[x, n] = x . W_n + b_n, with a meta-learned
initialisation (W0 (N, D), b0 (N,)) shared by every episode. Per episode (Finn et al., 2017):

1. theta_0 = (W0, b0); for s < S: theta_{s+1} = theta_s - alpha * dL_support/dtheta_s, where
   L_support is the SUMMED softmax cross-entropy of the N*K support examples (as LEO's inner
   loss). The gradient is in closed form, ((softmax - onehot)^T x, sum(softmax - onehot)),
   a differentiable function of theta, so the outer gradient is exactly second order
   (``first_order`` detaches it, opt-in only).
2. Outer objective: mean query cross-entropy under theta_S, averaged over the meta-batch;
   NaN fallback, clipping (0.1 by value then by norm) and TensorFlow-style Adam exactly as
   LEO (:mod:`leo.core.optim`).

Step size alpha: ``learn_inner_lr=False`` (the default, MAML "in its original form" as the
paper ran it) keeps alpha fixed at ``inner_lr``; ``True`` adds a learnable scalar
``inner_lr`` parameter initialised there (a Meta-SGD-like variant with one scalar). Left
unset, ``inner_lr`` is 1.0 at 1-shot and 0.1 at more shots: with K support examples a class's
summed support gradient is K times larger, and on Omniglot meta-validation 1.0 diverges at
5-shot (0.51 after 1,000 steps) where 0.1 reaches 0.97.

Initialisation: W0 Glorot-uniform from the seed, b0 = 0. Classes are randomly permuted
between episodes, so a good W0 is nearly the same for every class; MAML has to learn that.

No randomness: MAML has no dropout or sampling, so no noise argument is needed. Episodes
are drawn from a seeded generator as for LEO; the per-episode math is pure and vmapped over
the batch, and ``compile=True`` wraps it whole in ``torch.compile`` (:class:`MAMLStep`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from leo.comparison.maml_config import MAMLConfig, make_maml_config
from leo.core.model import Params
from leo.core.optim import Adam, clip_gradients, nan_fallback
from leo.meta.episodes import EpisodeSampler
from leo.meta.evaluate import Classifier
from leo.meta.loop import Method, TrainResult, read_checkpoint, run_loop
from leo.utils.compiling import maybe_compile
from leo.utils.device import DEFAULT_CPU_THREADS, resolve_device
from leo.utils.device import cpu_threads as cpu_threads_of
from leo.utils.errors import LeoInputError

if TYPE_CHECKING:
    from dvclive import Live


# ----------------------------------------------------------------------------- parameters
def init_maml_params(
    cfg: MAMLConfig, dim: int, generator: torch.Generator | None = None, device=None
) -> Params:
    """``W0`` (N, D) Glorot-uniform, ``b0`` (N,) zeros if ``use_bias``, ``inner_lr`` () if
    ``learn_inner_lr``; float32."""
    n = cfg.num_classes
    limit = math.sqrt(6.0 / (n + dim))
    params: Params = {"W0": torch.rand(n, dim, generator=generator) * (2 * limit) - limit}
    if cfg.use_bias:
        params["b0"] = torch.zeros(n)
    if cfg.learn_inner_lr:
        params["inner_lr"] = torch.tensor(float(cfg.inner_lr))
    return {k: v.to(device=device, dtype=torch.float32) for k, v in params.items()}


# ----------------------------------------------------------------------------- one episode
def _logits(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    return x @ w.T if b is None else x @ w.T + b


def support_grads(x: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Closed-form gradients of the summed support cross-entropy.

    Args:
        x: (N, K, D) support, row n is class n; w: (N, D); b: (N,) or None.

    Returns:
        dL/dw (N, D) = (softmax - onehot)^T x and dL/db (N,) = sum of (softmax - onehot).
    """
    n, k, d = x.shape
    flat = x.reshape(n * k, d)
    p = torch.softmax(_logits(flat, w, b), dim=-1)  # (NK, N)
    labels = torch.arange(n, device=x.device).repeat_interleave(k)
    r = p - F.one_hot(labels, n).to(p.dtype)
    return r.T @ flat, (None if b is None else r.sum(dim=0))


def maml_adapt(
    params: Params, x_support: Tensor, cfg: MAMLConfig, *, steps: int
) -> tuple[Tensor, Tensor | None]:
    """Inner loop of one episode: ``steps`` gradient steps from (W0, b0).

    Args:
        params: ``W0`` (N, D), optional ``b0`` (N,), optional learnable ``inner_lr`` ().
        x_support: (N, K, D).
        steps: S; 0 returns (W0, b0) themselves.

    Returns:
        adapted weights (N, D) and bias (N,) or None.
    """
    w, b = params["W0"], params.get("b0")
    alpha = params.get("inner_lr", cfg.inner_lr)
    for _ in range(steps):
        gw, gb = support_grads(x_support, w, b)
        if cfg.first_order:
            gw, gb = gw.detach(), (None if gb is None else gb.detach())
        w = w - alpha * gw
        b = None if b is None else b - alpha * gb
    return w, b


def maml_episode_loss(
    params: Params, x_support: Tensor, x_query: Tensor, cfg: MAMLConfig
) -> tuple[Tensor, Tensor]:
    """Query loss (mean cross-entropy) and accuracy of one episode after S training steps.

    Args:
        x_support: (N, K, D); x_query: (N, Q, D); row n of each is class n.
    """
    n, q, d = x_query.shape
    w, b = maml_adapt(params, x_support, cfg, steps=cfg.inner_steps)
    logits = _logits(x_query.reshape(n * q, d), w, b)
    labels = torch.arange(n, device=x_query.device).repeat_interleave(q)
    accuracy = (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()
    return F.cross_entropy(logits, labels), accuracy


def batch_maml_loss(
    params: Params, xs: Tensor, xq: Tensor, cfg: MAMLConfig
) -> tuple[Tensor, dict[str, Tensor]]:
    """Meta-loss of a batch, (B, N, K, D) support and (B, N, Q, D) queries, and its metrics."""
    loss, acc = torch.func.vmap(lambda s, q: maml_episode_loss(params, s, q, cfg))(xs, xq)
    return loss.mean(), {"query_loss": loss.mean(), "accuracy": acc.mean()}


def batch_maml_adapt(params: Params, xs: Tensor, cfg: MAMLConfig) -> tuple[Tensor, Tensor | None]:
    """Evaluation-mode adaptation: (B, N, K, D) -> weights (B, N, D), bias (B, N) or None."""
    steps = cfg.test_inner_steps
    if "b0" not in params:
        w = torch.func.vmap(lambda x: maml_adapt(params, x, cfg, steps=steps)[0])(xs)
        return w, None
    return torch.func.vmap(lambda x: maml_adapt(params, x, cfg, steps=steps))(xs)


# ----------------------------------------------------------------------------- batches
class MAMLStep:
    """One outer step: loss, gradients (second order unless cfg.first_order), update."""

    def __init__(self, cfg: MAMLConfig, device: torch.device | str | None = None) -> None:
        self.cfg = cfg
        loss_fn = functools.partial(batch_maml_loss, cfg=cfg)
        self.loss_fn = maybe_compile(loss_fn, cfg.compile, device)

    def __call__(self, params: Params, opt: Adam, xs: Tensor, xq: Tensor) -> dict[str, Tensor]:
        """Update ``params`` in place; return detached metric tensors (no host sync)."""
        loss, metrics = self.loss_fn(params, xs, xq)
        names = list(params)
        grads = dict(zip(names, torch.autograd.grad(loss, [params[k] for k in names]), strict=True))
        grads = nan_fallback(params, loss.detach(), grads)
        grads = clip_gradients(grads, self.cfg.gradient_threshold, self.cfg.gradient_norm_threshold)
        opt.step(params, grads)
        return {"loss": loss.detach(), **{k: v.detach() for k, v in metrics.items()}}


def maml_classifier(params: Params, cfg: MAMLConfig) -> Classifier:
    """MAML at evaluation (``test_inner_steps`` steps from W0) as a batched classifier."""
    frozen = {k: v.detach() for k, v in params.items()}
    device = next(iter(frozen.values())).device
    fn = maybe_compile(functools.partial(batch_maml_adapt, cfg=cfg), cfg.compile, device)

    @torch.no_grad()
    def classify(support: Tensor) -> tuple[Tensor, Tensor | None]:
        return fn(frozen, support)

    return classify


# ----------------------------------------------------------------------------- training
def maml_method(cfg: MAMLConfig, train, device: torch.device) -> Method:
    """MAML as a :class:`~leo.meta.loop.Method` meta-training on ``train`` (an EmbeddingSplit).

    Batches are episodes from one generator seeded ``cfg.seed``; the history rows add the
    step size ``inner_lr`` (learned or fixed) to the loop's columns.
    """
    sampler = EpisodeSampler(
        train.embeddings.to(device),
        train.labels,
        cfg.num_classes,
        cfg.num_shots,
        cfg.num_queries,
        class_names=train.class_names,
        split=train.split,
    )

    def draw(gens: tuple[torch.Generator, ...]) -> tuple[Tensor, Tensor]:
        xs, xq, _ = sampler.sample(cfg.batch_size, gens[0])
        return xs, xq

    def make_step(dev: torch.device):
        step = MAMLStep(cfg, dev)
        return lambda params, opt, batch: step(params, opt, *batch)

    def columns(params: Params) -> dict[str, float]:
        alpha = params["inner_lr"].detach() if "inner_lr" in params else cfg.inner_lr
        return {"inner_lr": float(alpha)}

    return Method(
        name="maml",
        config=cfg,
        init_params=lambda dim, gen, dev: init_maml_params(cfg, dim, gen, dev),
        num_generators=1,
        draw=draw,
        make_step=make_step,
        classifier=lambda params: maml_classifier(params, cfg),
        columns=columns,
    )


def maml_train(
    cfg: MAMLConfig,
    train,
    val,
    out_dir: str | Path,
    *,
    device=None,
    progress: bool = True,
    stop_after: int | None = None,
    prefetch: bool = True,
    live: Live | None = None,
    cpu_threads: int | None = DEFAULT_CPU_THREADS,
) -> TrainResult:
    """Meta-train MAML on ``train`` and keep the best on ``val`` (both EmbeddingSplit).

    The outer loop is LEO's (:func:`leo.meta.loop.run_loop`): ``out_dir`` gets ``best.pt``
    (``{"method": "maml", "params", "config", "step", "val_accuracy", "embedding_dim",
    "data_sha256"}``) and ``state.pt``; an interrupted run resumes exactly, a finished one
    returns at once, and a state saved by another config or on other data is refused.
    Validation uses the same episodes at every validation (seed ``cfg.seed +
    VAL_SEED_OFFSET``, as LEO).

    Args:
        cfg: the config; train, val: the meta-train and meta-validation splits.
        out_dir: where ``best.pt`` and ``state.pt`` go.
        device: torch device (default: CUDA when present).
        progress: show a progress bar.
        stop_after: stop (as if killed) after this many total steps; for tests.
        prefetch: draw the next batch on a background thread; the same batches either way.
        live: a fresh DVCLive log (:func:`leo.utils.live.open_live`) for the history rows.
        cpu_threads: intra-op CPU threads while it runs (None: torch's setting).

    Raises:
        LeoInputError: ``out_dir/state.pt`` was saved by another config or on other data.
    """
    device = resolve_device(device)
    with cpu_threads_of(cpu_threads):
        return run_loop(
            maml_method(cfg, train, device),
            train,
            val,
            out_dir,
            device=device,
            progress=progress,
            stop_after=stop_after,
            prefetch=prefetch,
            live=live,
        )


def load_maml_checkpoint(path: str | Path) -> tuple[Params, MAMLConfig, dict]:
    """Read a MAML ``best.pt``: (params, config, the rest), never executing pickled code.

    Raises:
        LeoInputError: missing, unreadable, or not a MAML checkpoint, naming the file.
    """
    obj = read_checkpoint(path, "maml")
    try:
        return obj["params"], make_maml_config(**obj["config"]), obj
    except (LeoInputError, TypeError) as err:
        raise LeoInputError(f"{path}: not a MAML checkpoint ({type(err).__name__})") from None
