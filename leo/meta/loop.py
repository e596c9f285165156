"""The outer meta-training loop shared by LEO and MAML: steps, validation, best, exact resume.

A method plugs in a :class:`Method` (its parameter initialisation, its batch drawing and
step, its evaluation classifier, its extra per-validation columns); :func:`run_loop` owns
the rest:

- steps on batches drawn by a background thread (:mod:`leo.meta.prefetch`; the same
  batches as drawing in line), from generators seeded ``cfg.seed + i``;
- every ``cfg.validate_every`` steps (and at the last), meta-validation on the same
  ``cfg.val_batches * cfg.val_batch_size`` episodes each time (seed ``cfg.seed +
  VAL_SEED_OFFSET``), one history row (step, train loss/accuracy averaged since the last
  validation, validation accuracy and CI, how many of those steps had a non-finite loss,
  the method's columns), logged to DVCLive when a log is given (:mod:`leo.utils.live`).
  The loss is averaged over the finite steps only: LEO's weight std is exp(raw) - (1 -
  offset), so a sampled classifier can now and then give an infinite or NaN loss, whose
  update the NaN fallback replaces (:mod:`leo.core.optim`, as the reference code);
- ``best.pt``, the best-on-validation parameters, and ``state.pt``, everything needed to
  continue after a kill (parameters, Adam moments, step, the generators' states, best so
  far, history, elapsed time, config, data digest), both written atomically with
  deterministic bytes (:func:`leo.utils.atomic.write_torch`); a rerun continues from
  ``state.pt`` and ends exactly where an uninterrupted run would, logging the saved history
  into its fresh DVCLive log first;
- a ``state.pt`` made by another method or config, or on other data (:func:`data_sha256`
  of the train and validation splits, recorded in ``state.pt`` and ``best.pt``), is refused
  with a LeoInputError naming the file, whether the run would resume or has finished; a
  fresh run first removes a ``best.pt`` it did not make.

Checkpoints hold only tensors and plain values, and are read with ``weights_only=True``.
Timings live in ``state.pt`` and :class:`TrainResult` only, never in ``best.pt`` or the
history, so equal inputs give byte-identical ``best.pt`` and DVCLive plot files.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from leo.core.model import Params
from leo.core.optim import Adam
from leo.meta.evaluate import Classifier, eval_sampler, evaluate_classifier
from leo.meta.prefetch import Prefetcher
from leo.utils.atomic import write_torch
from leo.utils.errors import LeoInputError
from leo.utils.live import log_row, log_rows

if TYPE_CHECKING:
    from dvclive import Live

VAL_SEED_OFFSET = 10_007  # validation episodes: fixed by cfg.seed, the same at every validation
BEST_FILE = "best.pt"
STATE_FILE = "state.pt"
HISTORY_FIELDS = [
    "step",
    "train_loss",  # mean over the interval's steps with a finite loss
    "train_accuracy",
    "val_accuracy",
    "val_ci95",
    "nonfinite_steps",  # steps of the interval whose loss was NaN or infinite
]

Batch = Any  # what a method's ``draw`` returns and its step consumes
StepFn = Callable[[Params, Adam, Batch], dict[str, torch.Tensor]]


@dataclass
class TrainResult:
    """What a meta-training run produced.

    Attributes:
        best_val_accuracy, best_step: the best validation and its step.
        steps: outer steps done (less than ``num_steps`` after ``stop_after``).
        wall_seconds: training time, summed over resumed runs.
        checkpoint: the ``best.pt`` path.
        history: one row per validation (:data:`HISTORY_FIELDS` and the method's columns).
    """

    best_val_accuracy: float
    best_step: int
    steps: int
    wall_seconds: float
    checkpoint: Path
    history: list[dict]


@dataclass
class Method:
    """What a meta-learner plugs into :func:`run_loop`.

    Attributes:
        name: ``"leo"`` or ``"maml"``; recorded as ``best.pt``'s ``"method"``.
        config: LEOConfig or MAMLConfig (``num_steps``, ``validate_every``, ``val_batches``,
            ``val_batch_size``, ``outer_lr``, ``seed``, ``num_classes``, ``num_shots``,
            ``eval_per_class_total``, ``to_dict()``).
        init_params: ``(dim, generator, device) -> params``; the generator is a CPU one
            seeded ``cfg.seed``.
        num_generators: generators the batches are drawn from (seeded ``cfg.seed + i``, on
            the device).
        draw: ``(generators) -> batch``: the next meta-training batch.
        make_step: ``(device) -> step``; ``step(params, opt, batch)`` updates ``params`` in
            place and returns detached metric tensors, at least ``loss`` and ``accuracy``.
        classifier: ``(params) -> Classifier`` at evaluation; built once after
            initialisation or resume, it must read the parameters as they are updated.
        columns: ``(params) -> {name: float}``: the method's extra history columns.
    """

    name: str
    config: Any
    init_params: Callable[[int, torch.Generator, torch.device], Params]
    num_generators: int
    draw: Callable[[tuple[torch.Generator, ...]], Batch]
    make_step: Callable[[torch.device], StepFn]
    classifier: Callable[[Params], Classifier]
    columns: Callable[[Params], dict[str, float]] = field(default=lambda params: {})


def data_sha256(*splits) -> str:
    """sha256 of the splits' embeddings (float32, row-major) and labels (int64), in order.

    Two EmbeddingSplits with equal digests hold the same rows with the same labels.
    """
    digest = hashlib.sha256()
    for split in splits:
        x = split.embeddings.detach().to("cpu", torch.float32).contiguous()
        y = split.labels.detach().to("cpu", torch.int64).contiguous()
        digest.update(repr((tuple(x.shape), tuple(y.shape))).encode())
        digest.update(x.numpy().tobytes())
        digest.update(y.numpy().tobytes())
    return digest.hexdigest()


def read_checkpoint(path: str | Path, method: str, map_location="cpu") -> dict:
    """A ``best.pt`` of ``method`` as a dict, never executing pickled code.

    A checkpoint without a ``"method"`` entry counts as LEO's (written before MAML had one).

    Raises:
        LeoInputError: missing, unreadable, or another method's checkpoint, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: checkpoint not found")
    what = f"{path}: not a {method.upper()} checkpoint"
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # any unpickling failure is bad input, never executed code
        raise LeoInputError(f"{what} ({type(err).__name__})") from None
    if not isinstance(obj, dict) or not {"params", "config"} <= obj.keys():
        raise LeoInputError(f"{what} (KeyError)")
    if obj.get("method", "leo") != method:
        raise LeoInputError(f"{what} (a {obj.get('method')!r} checkpoint)")
    return obj


def _load_state(path: Path, method: Method, digest: str, device: torch.device) -> dict:
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # any unpickling failure is bad input, never executed code
        raise LeoInputError(
            f"{path}: unreadable training state ({type(err).__name__}); remove it to restart"
        ) from None
    if not isinstance(state, dict):
        raise LeoInputError(f"{path}: not a training state; remove it to restart")
    if state.get("method", method.name) != method.name or state.get("config") != (
        method.config.to_dict()
    ):
        raise LeoInputError(f"{path}: saved by a different config; remove it to restart")
    if state.get("data_sha256") != digest:
        raise LeoInputError(
            f"{path}: saved by a run on other data (train/val embeddings or labels differ); "
            "remove it to restart"
        )
    return state


def run_loop(
    method: Method,
    train,
    val,
    out_dir: str | Path,
    *,
    device: torch.device,
    progress: bool = True,
    stop_after: int | None = None,
    prefetch: bool = True,
    live: Live | None = None,
) -> TrainResult:
    """Meta-train ``method`` on ``train``, select on ``val`` (both EmbeddingSplit).

    Args:
        method: the meta-learner.
        train, val: the meta-train and meta-validation splits (``val`` only for selection).
        out_dir: where ``best.pt`` and ``state.pt`` go; an existing ``state.pt`` of the same
            method, config and data is resumed (a finished one returns its result at once).
        device: the torch device.
        progress: show a progress bar (steps/s, loss, validation accuracy).
        stop_after: stop (as if killed) after this many total steps; for tests.
        prefetch: draw the next batch on a background thread; the same batches either way.
        live: a fresh DVCLive log (:func:`leo.utils.live.open_live`) that receives every
            history row, the saved ones of a resumed run first, and ``best_val_accuracy``
            and ``best_step`` in its summary; None: no log.

    Raises:
        LeoInputError: ``state.pt`` unreadable, or saved by another method, config or data.
    """
    cfg = method.config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = data_sha256(train, val)
    val_sampler = eval_sampler(val, cfg, device)
    gens = tuple(
        torch.Generator(device=device).manual_seed(cfg.seed + i)
        for i in range(method.num_generators)
    )
    params = method.init_params(train.dim, torch.Generator().manual_seed(cfg.seed), device)
    opt = Adam(params, cfg.outer_lr)
    step, best, history, elapsed = 0, {"val_accuracy": -1.0, "step": 0}, [], 0.0

    state_path = out / STATE_FILE
    if state_path.is_file():
        state = _load_state(state_path, method, digest, device)
        params = {k: v.to(device) for k, v in state["params"].items()}
        opt.load_state_dict(state["adam"])
        for gen, gen_state in zip(gens, state["generators"], strict=True):
            gen.set_state(gen_state)
        step, best, history = state["step"], state["best"], state["history"]
        elapsed = state["elapsed"]
    else:
        (out / BEST_FILE).unlink(missing_ok=True)  # a fresh run: best.pt will be this run's
    for p in params.values():
        p.requires_grad_(True)
    if live is not None and history:
        live.summary.update(best_val_accuracy=best["val_accuracy"], best_step=best["step"])
    log_rows(live, history)

    step_fn = method.make_step(device)
    classify = method.classifier(params)  # reads the parameters as they are updated in place
    start = time.perf_counter() - elapsed
    sums: dict[str, torch.Tensor] = {}
    since = 0
    end = cfg.num_steps if stop_after is None else min(cfg.num_steps, stop_after)
    bar = tqdm(
        total=cfg.num_steps, initial=step, desc=method.name, unit="step", disable=not progress
    )
    batches = Prefetcher(lambda: method.draw(gens), gens, enabled=prefetch and step < end)
    try:
        while step < end:
            drawn = next(batches)
            metrics = step_fn(params, opt, drawn.batch)
            # the loss averaged over the steps where it is finite; the others (their update
            # made by the NaN fallback, leo.core.optim) are counted apart
            loss = torch.as_tensor(metrics["loss"], dtype=torch.float64)
            finite = torch.isfinite(loss).to(torch.float64)
            for k, v in (
                ("loss", torch.nan_to_num(loss) * finite),
                ("finite", finite),
                ("accuracy", metrics["accuracy"]),
            ):
                sums[k] = sums.get(k, 0.0) + v
            since += 1
            step += 1
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
            finite_steps = round(float(sums["finite"]))
            row = {
                "step": step,
                "train_loss": float(sums["loss"]) / finite_steps if finite_steps else math.nan,
                "train_accuracy": float(sums["accuracy"]) / since,
                "val_accuracy": val_result.mean,
                "val_ci95": val_result.ci95,
                "nonfinite_steps": since - finite_steps,
                **method.columns(params),
            }
            history.append(row)
            sums, since = {}, 0
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", val=f"{row['val_accuracy']:.4f}")
            if row["val_accuracy"] > best["val_accuracy"]:
                best = {"val_accuracy": row["val_accuracy"], "step": step}
                write_torch(
                    out / BEST_FILE,
                    {
                        "method": method.name,
                        "params": {k: v.detach().cpu() for k, v in params.items()},
                        "config": cfg.to_dict(),
                        "step": step,
                        "val_accuracy": row["val_accuracy"],
                        "embedding_dim": train.dim,
                        "data_sha256": digest,
                    },
                )
            write_torch(
                state_path,
                {
                    "method": method.name,
                    "params": {k: v.detach() for k, v in params.items()},
                    "adam": opt.state_dict(),
                    "step": step,
                    "generators": list(drawn.states_after),
                    "best": best,
                    "history": history,
                    "elapsed": time.perf_counter() - start,
                    "config": cfg.to_dict(),
                    "data_sha256": digest,
                },
            )
            if live is not None:
                live.summary.update(best_val_accuracy=best["val_accuracy"], best_step=best["step"])
            log_row(live, row)
    finally:
        batches.close()
        bar.close()
    return TrainResult(
        best_val_accuracy=best["val_accuracy"],
        best_step=best["step"],
        steps=step,
        wall_seconds=time.perf_counter() - start,
        checkpoint=out / BEST_FILE,
        history=history,
    )
