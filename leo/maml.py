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
   LEO (:mod:`leo.optim`).

Step size alpha: ``learn_inner_lr=False`` (the default, MAML "in its original form" as the
paper ran it) keeps alpha fixed at ``inner_lr``; ``True`` adds a learnable scalar
``inner_lr`` parameter initialised there (a Meta-SGD-like variant with one scalar).

Initialisation: W0 Glorot-uniform from the seed, b0 = 0. Classes are randomly permuted
between episodes, so a good W0 is nearly the same for every class; MAML has to learn that.

No randomness: MAML has no dropout or sampling, so no noise argument is needed. Episodes
are drawn from a seeded generator as for LEO; the per-episode math is pure and vmapped over
the batch, and ``compile=True`` wraps it whole in ``torch.compile`` (:class:`MAMLStep`).
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from leo.atomic import write_text
from leo.episodes import EpisodeSampler
from leo.errors import LeoInputError
from leo.evaluate import Classifier, eval_sampler, evaluate_classifier
from leo.model import Params
from leo.optim import Adam, clip_gradients, nan_fallback
from leo.train import VAL_SEED_OFFSET, TrainResult, default_device, save_checkpoint


@dataclass(frozen=True)
class MAMLConfig:
    """MAML's knobs; the problem, protocol and execution fields mean what they do in LEO."""

    # --- problem (as LEOConfig) ---
    num_classes: int = 5  # N
    num_shots: int = 1  # K
    num_queries: int = 15  # queries per class in meta-training episodes
    eval_per_class_total: int | None = 600  # support + queries per class at evaluation

    # --- model ---
    inner_steps: int = 5  # S: gradient steps on the support loss (Finn et al.: 5 in training)
    eval_inner_steps: int | None = None  # None: same as inner_steps (Finn et al.: 10 at test)
    inner_lr: float = 1.0  # alpha (fixed), or its init when learn_inner_lr; see module doc
    learn_inner_lr: bool = False  # False: fixed alpha, MAML's original form
    use_bias: bool = True  # meta-learn and adapt a bias b (N,) beside W (N, D)
    first_order: bool = False  # opt-in: stop gradients through the inner-loop gradients

    # --- outer optimisation (same clipping and Adam as LEO) ---
    outer_lr: float = 1e-3  # Adam learning rate (Finn et al.'s meta step size)
    gradient_threshold: float = 0.1  # clip every gradient element to +-this
    gradient_norm_threshold: float = 0.1  # then clip each tensor's norm to this
    batch_size: int = 12  # episodes per meta-batch
    num_steps: int = 100_000  # outer steps (early stopping keeps the best validation)
    validate_every: int = 1_000  # steps between meta-validations
    val_batches: int = 10  # meta-validation: batches of ...
    val_batch_size: int = 200  # ... episodes each

    # --- execution ---
    seed: int = 0
    compile: bool = True  # torch.compile the batched loss; False = eager

    def __post_init__(self) -> None:
        checks = [
            (self.num_classes >= 2, "num_classes must be >= 2"),
            (self.num_shots >= 1, "num_shots must be >= 1"),
            (self.num_queries >= 1, "num_queries must be >= 1"),
            (self.inner_steps >= 0, "inner_steps must be >= 0"),
            (self.eval_inner_steps is None or self.eval_inner_steps >= 0, "eval_inner_steps < 0"),
            (self.inner_lr >= 0, "inner_lr must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise LeoInputError(f"MAML config: {message}")

    @property
    def test_inner_steps(self) -> int:
        """Adaptation steps at evaluation."""
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and JSON)."""
        return dataclasses.asdict(self)


def make_maml_config(**overrides: Any) -> MAMLConfig:
    """MAMLConfig from field overrides.

    Raises:
        LeoInputError: an unknown field, naming it.
    """
    fields = {f.name for f in dataclasses.fields(MAMLConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise LeoInputError(f"unknown MAML config key {unknown[0]!r}")
    return MAMLConfig(**overrides)


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

    def __init__(self, cfg: MAMLConfig) -> None:
        self.cfg = cfg
        loss_fn = functools.partial(batch_maml_loss, cfg=cfg)
        self.loss_fn = torch.compile(loss_fn, dynamic=False) if cfg.compile else loss_fn

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
    fn = functools.partial(batch_maml_adapt, cfg=cfg)
    fn = torch.compile(fn, dynamic=False) if cfg.compile else fn
    frozen = {k: v.detach() for k, v in params.items()}

    @torch.no_grad()
    def classify(support: Tensor) -> tuple[Tensor, Tensor | None]:
        return fn(frozen, support)

    return classify


# ----------------------------------------------------------------------------- training
HISTORY_FIELDS = [
    "step",
    "train_loss",
    "train_accuracy",
    "val_accuracy",
    "val_ci95",
    "inner_lr",
    "elapsed_seconds",
]


def maml_train(
    cfg: MAMLConfig,
    train,
    val,
    out_dir: str | Path,
    *,
    device=None,
    progress: bool = True,
) -> TrainResult:
    """Meta-train MAML on ``train`` and keep the best on ``val`` (both EmbeddingSplit).

    Writes ``best.pt`` (``{"method": "maml", "params", "config", "step", "val_accuracy",
    "embedding_dim"}``, atomically, tensors and plain values only) and ``history.csv`` (one
    row per validation) under ``out_dir``. Validation uses the same episodes at every
    validation (seed ``cfg.seed + VAL_SEED_OFFSET``, as LEO). Unlike :func:`leo.train.meta_train`
    there is no resume: a MAML run on embeddings is short, and a rerun starts over.
    """
    device = torch.device(device) if device is not None else default_device()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dim = train.dim
    train_sampler = EpisodeSampler(
        train.embeddings.to(device),
        train.labels,
        cfg.num_classes,
        cfg.num_shots,
        cfg.num_queries,
        class_names=train.class_names,
        split=train.split,
    )
    val_sampler = eval_sampler(val, cfg, device)
    episode_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    params = init_maml_params(cfg, dim, torch.Generator().manual_seed(cfg.seed), device)
    for p in params.values():
        p.requires_grad_(True)
    opt = Adam(params, cfg.outer_lr)
    step_fn = MAMLStep(cfg)
    classify = maml_classifier(params, cfg)  # reads the live parameters (updated in place)
    best = {"val_accuracy": -1.0, "step": 0}
    history: list[dict] = []
    sums: dict[str, Tensor] = {}
    since, step, start = 0, 0, time.perf_counter()
    bar = tqdm(total=cfg.num_steps, desc="maml", unit="step", disable=not progress)
    while step < cfg.num_steps:
        xs, xq, _ = train_sampler.sample(cfg.batch_size, episode_gen)
        metrics = step_fn(params, opt, xs, xq)
        for k in ("loss", "accuracy"):
            sums[k] = sums.get(k, 0.0) + metrics[k]
        since, step = since + 1, step + 1
        bar.update(1)
        if step % cfg.validate_every and step != cfg.num_steps:
            continue
        val_result = evaluate_classifier(
            classify,
            val_sampler,
            num_episodes=cfg.val_batches * cfg.val_batch_size,
            batch_size=cfg.val_batch_size,
            seed=cfg.seed + VAL_SEED_OFFSET,
        )
        alpha = params["inner_lr"].detach() if "inner_lr" in params else cfg.inner_lr
        row = {
            "step": step,
            "train_loss": float(sums["loss"]) / since,
            "train_accuracy": float(sums["accuracy"]) / since,
            "val_accuracy": val_result.mean,
            "val_ci95": val_result.ci95,
            "inner_lr": float(alpha),
            "elapsed_seconds": time.perf_counter() - start,
        }
        history.append(row)
        sums, since = {}, 0
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_accuracy']:.4f}")
        if row["val_accuracy"] > best["val_accuracy"]:
            best = {"val_accuracy": row["val_accuracy"], "step": step}
            save_checkpoint(
                out / "best.pt",
                {
                    "method": "maml",
                    "params": {k: v.detach().cpu() for k, v in params.items()},
                    "config": cfg.to_dict(),
                    "step": step,
                    "val_accuracy": row["val_accuracy"],
                    "embedding_dim": dim,
                },
            )
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(history)
        write_text(out / "history.csv", buf.getvalue())
    bar.close()
    return TrainResult(
        best_val_accuracy=best["val_accuracy"],
        best_step=best["step"],
        steps=step,
        wall_seconds=time.perf_counter() - start,
        checkpoint=out / "best.pt",
        history=history,
    )


def load_maml_checkpoint(path: str | Path) -> tuple[Params, MAMLConfig, dict]:
    """Read a MAML ``best.pt``: (params, config, the rest), never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if obj.get("method") != "maml":
            raise KeyError("method")
        return obj["params"], make_maml_config(**obj["config"]), obj
    except (KeyError, AttributeError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise LeoInputError(f"{path}: not a MAML checkpoint ({type(err).__name__})") from None
