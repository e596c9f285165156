"""Meta-training: the outer loop with meta-validation, best checkpoint and exact resume.

``out_dir`` holds:

- ``best.pt``: the best-on-validation parameters (``{"params", "config", "step",
  "val_accuracy", "embedding_dim"}``), written atomically;
- ``state.pt``: everything needed to continue the same run after a kill (parameters, Adam
  moments, step, both generators' states, best so far, history), written atomically at each
  validation; a rerun continues from it and ends exactly where an uninterrupted run would;
- ``history.csv``: one row per validation (step, train loss/accuracy averaged since the last
  validation, validation accuracy and CI, mean learned step sizes, elapsed seconds).

Checkpoints hold only tensors and plain values, and are read with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import io
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from leo.atomic import atomic_path, write_text
from leo.batched import MetaStep
from leo.config import LEOConfig, config_from_dict
from leo.episodes import EpisodeSampler
from leo.errors import LeoInputError
from leo.evaluate import eval_sampler, evaluate_classifier, leo_classifier
from leo.model import Params, init_params
from leo.noise import draw_noise
from leo.optim import Adam
from leo.prefetch import Prefetcher

HISTORY_FIELDS = [
    "step",
    "train_loss",
    "train_accuracy",
    "val_accuracy",
    "val_ci95",
    "inner_lr_mean",
    "finetune_lr_mean",
    "elapsed_seconds",
]
VAL_SEED_OFFSET = 10_007  # validation episodes: fixed by cfg.seed, the same at every validation


@dataclass
class TrainResult:
    """What a meta-training run produced."""

    best_val_accuracy: float
    best_step: int
    steps: int
    wall_seconds: float
    checkpoint: Path
    history: list[dict]


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def save_checkpoint(path: Path, obj: dict) -> None:
    """torch.save atomically."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> tuple[Params, LEOConfig, dict]:
    """Read ``best.pt``: (params, config, the rest), never executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: checkpoint not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        return obj["params"], config_from_dict(obj["config"]), obj
    except (KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as err:
        raise LeoInputError(f"{path}: not a LEO checkpoint ({type(err).__name__})") from None


def _write_history(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def meta_train(
    cfg: LEOConfig,
    train,
    val,
    out_dir: str | Path,
    *,
    device=None,
    progress: bool = True,
    stop_after: int | None = None,
    prefetch: bool = True,
) -> TrainResult:
    """Meta-train LEO on ``train`` and select on ``val`` (both EmbeddingSplit).

    Args:
        cfg: the config (``num_steps``, ``validate_every``, ``val_batches``, ...).
        train, val: the meta-train and meta-validation splits.
        out_dir: where ``best.pt``, ``state.pt`` and ``history.csv`` go; an existing
            ``state.pt`` of the same config is resumed.
        device: torch device (default: CUDA when present).
        progress: show a progress bar (steps/s, loss, validation accuracy).
        stop_after: stop (as if killed) after this many total steps; for tests.
        prefetch: draw the next batch (episodes and noise) on a background thread while
            this one trains (:mod:`leo.prefetch`); the same batches either way.
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
    noise_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    params = init_params(cfg, dim, torch.Generator().manual_seed(cfg.seed), device)
    opt = Adam(params, cfg.outer_lr)
    step, best, history, elapsed = 0, {"val_accuracy": -1.0, "step": 0}, [], 0.0

    state_path = out / "state.pt"
    if state_path.is_file():
        state = torch.load(state_path, map_location=device, weights_only=True)
        if state["config"] != cfg.to_dict():
            raise LeoInputError(f"{state_path}: saved by a different config; remove it to restart")
        params = {k: v.to(device) for k, v in state["params"].items()}
        opt.load_state_dict(state["adam"])
        episode_gen.set_state(state["episode_gen"])
        noise_gen.set_state(state["noise_gen"])
        step, best, history, elapsed = (
            state["step"],
            state["best"],
            state["history"],
            state["elapsed"],
        )
    for p in params.values():
        p.requires_grad_(True)

    meta_step = MetaStep(cfg)
    start = time.perf_counter() - elapsed
    sums: dict[str, torch.Tensor] = {}
    since = 0
    end = cfg.num_steps if stop_after is None else min(cfg.num_steps, stop_after)
    bar = tqdm(
        total=cfg.num_steps, initial=step, desc="meta-train", unit="step", disable=not progress
    )

    def draw():
        xs, xq, _ = train_sampler.sample(cfg.batch_size, episode_gen)
        return xs, xq, draw_noise(cfg, cfg.batch_size, cfg.num_queries, dim, noise_gen)

    batches = Prefetcher(draw, (episode_gen, noise_gen), enabled=prefetch and step < end)
    try:
        while step < end:
            drawn = next(batches)
            xs, xq, noise = drawn.batch
            metrics = meta_step(params, opt, xs, xq, noise)
            for k in ("loss", "accuracy"):
                sums[k] = sums.get(k, 0.0) + metrics[k]
            since += 1
            step += 1
            bar.update(1)
            if step % cfg.validate_every == 0 or step == cfg.num_steps:
                val_result = evaluate_classifier(
                    leo_classifier(params, cfg),
                    val_sampler,
                    num_episodes=cfg.val_batches * cfg.val_batch_size,
                    batch_size=cfg.val_batch_size,
                    seed=cfg.seed + VAL_SEED_OFFSET,
                )
                row = {
                    "step": step,
                    "train_loss": float(sums["loss"]) / since,
                    "train_accuracy": float(sums["accuracy"]) / since,
                    "val_accuracy": val_result.mean,
                    "val_ci95": val_result.ci95,
                    "inner_lr_mean": float(params["inner_lr"].detach().mean()),
                    "finetune_lr_mean": float(params["finetune_lr"].detach().mean()),
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
                            "params": {k: v.detach().cpu() for k, v in params.items()},
                            "config": cfg.to_dict(),
                            "step": step,
                            "val_accuracy": row["val_accuracy"],
                            "embedding_dim": dim,
                        },
                    )
                _write_history(out / "history.csv", history)
                save_checkpoint(
                    state_path,
                    {
                        "params": {k: v.detach() for k, v in params.items()},
                        "adam": opt.state_dict(),
                        "step": step,
                        "episode_gen": drawn.states_after[0],
                        "noise_gen": drawn.states_after[1],
                        "best": best,
                        "history": history,
                        "elapsed": time.perf_counter() - start,
                        "config": cfg.to_dict(),
                    },
                )
    finally:
        batches.close()
    bar.close()
    return TrainResult(
        best_val_accuracy=best["val_accuracy"],
        best_step=best["step"],
        steps=step,
        wall_seconds=time.perf_counter() - start,
        checkpoint=out / "best.pt",
        history=history,
    )
