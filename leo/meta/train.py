"""LEO meta-training: LEO's part of the shared outer loop (:mod:`leo.meta.loop`).

``out_dir`` holds ``best.pt`` (``{"method": "leo", "params", "config", "step",
"val_accuracy", "embedding_dim", "data_sha256"}``: the best-on-validation parameters) and
``state.pt`` (what an exact resume needs); the history is returned, and logged to DVCLive
when a log is given. Batches are episodes from a generator seeded ``cfg.seed`` and the
noise of the explicit gradients from one seeded ``cfg.seed + 1``; the history rows add the
mean learned step sizes (``inner_lr_mean``, ``finetune_lr_mean``) to the loop's columns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from leo.core.config import LEOConfig, config_from_dict
from leo.core.model import Params, init_params
from leo.core.noise import draw_noise
from leo.core.step import MetaStep
from leo.meta.episodes import EpisodeSampler
from leo.meta.evaluate import leo_classifier
from leo.meta.loop import (
    HISTORY_FIELDS,
    VAL_SEED_OFFSET,
    Method,
    TrainResult,
    read_checkpoint,
    run_loop,
)
from leo.utils.device import DEFAULT_CPU_THREADS, resolve_device
from leo.utils.device import cpu_threads as cpu_threads_of
from leo.utils.errors import LeoInputError

if TYPE_CHECKING:
    from dvclive import Live

__all__ = [
    "HISTORY_FIELDS",
    "LEO_COLUMNS",
    "VAL_SEED_OFFSET",
    "TrainResult",
    "leo_method",
    "load_checkpoint",
    "meta_train",
]

LEO_COLUMNS = ["inner_lr_mean", "finetune_lr_mean"]  # LEO's columns after HISTORY_FIELDS


def load_checkpoint(path: str | Path) -> tuple[Params, LEOConfig, dict]:
    """Read ``best.pt``: (params, config, the rest), never executing pickled code.

    Raises:
        LeoInputError: missing, unreadable, or not a LEO checkpoint, naming the file.
    """
    obj = read_checkpoint(path, "leo")
    try:
        return obj["params"], config_from_dict(obj["config"]), obj
    except (LeoInputError, TypeError) as err:
        raise LeoInputError(f"{path}: not a LEO checkpoint ({type(err).__name__})") from None


def leo_method(cfg: LEOConfig, train, device: torch.device) -> Method:
    """LEO as a :class:`~leo.meta.loop.Method` meta-training on ``train`` (an EmbeddingSplit)."""
    sampler = EpisodeSampler(
        train.embeddings.to(device),
        train.labels,
        cfg.num_classes,
        cfg.num_shots,
        cfg.num_queries,
        class_names=train.class_names,
        split=train.split,
    )

    def draw(gens: tuple[torch.Generator, ...]):
        episode_gen, noise_gen = gens
        xs, xq, _ = sampler.sample(cfg.batch_size, episode_gen)
        return xs, xq, draw_noise(cfg, cfg.batch_size, cfg.num_queries, train.dim, noise_gen)

    def make_step(dev: torch.device):
        meta_step = MetaStep(cfg, dev)
        return lambda params, opt, batch: meta_step(params, opt, *batch)

    def columns(params: Params) -> dict[str, float]:
        return {
            "inner_lr_mean": float(params["inner_lr"].detach().mean()),
            "finetune_lr_mean": float(params["finetune_lr"].detach().mean()),
        }

    return Method(
        name="leo",
        config=cfg,
        init_params=lambda dim, gen, dev: init_params(cfg, dim, gen, dev),
        num_generators=2,
        draw=draw,
        make_step=make_step,
        classifier=lambda params: leo_classifier(params, cfg),
        columns=columns,
    )


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
    live: Live | None = None,
    cpu_threads: int | None = DEFAULT_CPU_THREADS,
) -> TrainResult:
    """Meta-train LEO on ``train`` and select on ``val`` (both EmbeddingSplit).

    Args:
        cfg: the config (``num_steps``, ``validate_every``, ``val_batches``, ...).
        train, val: the meta-train and meta-validation splits.
        out_dir: where ``best.pt`` and ``state.pt`` go; an existing ``state.pt`` of the same
            config and data is resumed (a finished one returns its result at once).
        device: torch device (default: CUDA when present).
        progress: show a progress bar (steps/s, loss, validation accuracy).
        stop_after: stop (as if killed) after this many total steps; for tests.
        prefetch: draw the next batch (episodes and noise) on a background thread while
            this one trains (:mod:`leo.meta.prefetch`); the same batches either way.
        live: a fresh DVCLive log (:func:`leo.utils.live.open_live`) for the history rows.
        cpu_threads: intra-op CPU threads while it runs (None: torch's setting).

    Raises:
        LeoInputError: ``out_dir/state.pt`` was saved by another config or on other data.
    """
    device = resolve_device(device)
    with cpu_threads_of(cpu_threads):
        return run_loop(
            leo_method(cfg, train, device),
            train,
            val,
            out_dir,
            device=device,
            progress=progress,
            stop_after=stop_after,
            prefetch=prefetch,
            live=live,
        )
