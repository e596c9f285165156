"""Supervised pre-training of the Wide ResNet on the meta-train classes (paper section 2.3.4).

Only ``train.npz`` of the prepared dataset is read: the meta-validation and meta-test
classes are never seen. A seeded held-out slice of every meta-train class selects the
checkpoint (best held-out accuracy). SGD with momentum and weight decay, a cosine or step
schedule evaluated per iteration, augmentation on the device.

Resumable: after every epoch a resume checkpoint (model, optimizer, epoch, best so far,
history, elapsed time, a fingerprint of config and data) is written atomically. Every
epoch draws its randomness (shuffling, augmentation, dropout) from generators seeded by
``(seed, epoch)``, so the RNG state at an epoch boundary is a function of the epoch number
and a resumed run ends with the same weights as an uninterrupted one.

Logs: one row per epoch (``train_loss``, ``train_acc``, ``heldout_acc``, ``lr`` at step =
epoch) into a DVCLive log when one is given (:mod:`leo.utils.live`); a resumed run logs the
saved epochs first, so the log equals an uninterrupted run's. Checkpoints are written with
:func:`leo.utils.atomic.write_torch` and hold no timings, so equal runs give equal bytes.

Data parallel (``dist``: ``W`` processes under torchrun, :mod:`leo.backbone.distributed`):
the same global batch and learning-rate schedule as one process, each rank training on
``batch_size / W`` rows of every global batch (:mod:`leo.backbone.epoch`) inside
DistributedDataParallel; with batch norm synchronised across processes (``sync_bn``) the
trained model equals one process's up to float rounding. Rank 0 alone writes the resume
file, ``backbone.pt`` and the log; at start it reads the resume file and sends it to every
rank. Each rank holds the whole training split in memory. With one process the code path and
every byte written are those of a plain run.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from leo.backbone.config import PretrainConfig
from leo.backbone.distributed import Dist, sync_batchnorm
from leo.backbone.epoch import accuracy, lr_at, train_epoch
from leo.backbone.wrn import WideResNet, WRNConfig, backbone_checkpoint, channel_stats
from leo.data.prepared import MANIFEST, load_manifest, load_prepared_split
from leo.utils.atomic import write_torch
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256
from leo.utils.live import log_row, log_rows

if TYPE_CHECKING:
    from dvclive import Live

BACKBONE_FILE = "backbone.pt"
RUN_ONLY = ("device", "processes", "wall_seconds")  # metrics of how it ran, not in backbone.pt


def split_heldout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``round(fraction * n_c)`` (at least 1, at most ``n_c - 1``) images per class.

    Args:
        labels: int ``(n,)`` class of every image.
        fraction: held-out fraction per class.
        seed: seed of the choice.

    Returns:
        ``(train_idx, heldout_idx)``, sorted int64 index arrays partitioning ``range(n)``.
    """
    rng = np.random.default_rng([seed, 0x5EED])
    heldout = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        k = min(max(1, round(fraction * len(idx))), len(idx) - 1)
        heldout.append(rng.choice(idx, size=k, replace=False))
    held = np.sort(np.concatenate(heldout)) if heldout else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[held] = False
    return np.flatnonzero(mask).astype(np.int64), held.astype(np.int64)


def _load_resume(path: Path, fingerprint: str) -> dict | None:
    """The resume checkpoint at ``path`` if it exists and matches ``fingerprint``."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a bad resume file is reported, never executed
        raise LeoInputError(
            f"{path}: unreadable resume checkpoint ({type(err).__name__})"
        ) from None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        return None  # another config or other data: start afresh
    return state


def pretrain(
    prepared_root: str | Path,
    out_dir: str | Path,
    cfg: PretrainConfig,
    device: torch.device | str = "cpu",
    resume_path: str | Path | None = None,
    stop_after: int | None = None,
    live: Live | None = None,
    dist: Dist | None = None,
    sync_bn: bool = True,
) -> dict:
    """Pre-train a WRN on the meta-train split and save the best held-out checkpoint.

    Args:
        prepared_root: prepared dataset directory (only ``train.npz`` and the manifest are read).
        out_dir: where ``backbone.pt`` is written.
        cfg: the configuration.
        device: torch device.
        resume_path: resume checkpoint, written every epoch and read at start when it
            matches this config and data; removed after success. None: no resume.
        stop_after: stop after this many completed epochs (simulates a kill; for tests).
        live: a fresh DVCLive log (:func:`leo.utils.live.open_live`) for the epoch rows
            (step = epoch); None: no log. Give it on rank 0 only.
        dist: the processes (:func:`leo.backbone.distributed.init_distributed`; None: one);
            its device replaces ``device``. Rank 0 writes every file.
        sync_bn: with several processes, batch-norm statistics over all of them.

    Returns:
        Metrics: ``backbone_heldout_accuracy`` (best over epochs, the selected model),
        ``backbone_train_accuracy`` (the selected model in eval mode on the non-held-out
        images), ``epochs``, ``best_epoch``, ``wall_seconds`` (summed over resumed runs),
        ``num_classes``, ``feature_dim``, image counts, ``device``, ``processes``, and
        ``history`` (one dict per epoch: epoch, train_loss, train_acc, heldout_acc, lr at
        the epoch start).

    Raises:
        LeoInputError: unreadable resume file, or a batch size that the processes do not
            divide.
    """
    t0 = time.perf_counter()
    dist = dist or Dist.single(device)
    device = dist.device
    if cfg.batch_size % dist.world_size:
        raise LeoInputError(
            f"batch_size {cfg.batch_size} is not divisible by the {dist.world_size} processes "
            "(each takes an equal share of the global batch)"
        )
    prepared_root, out_dir = Path(prepared_root), Path(out_dir)
    split = load_prepared_split(prepared_root, "train")
    dataset = load_manifest(prepared_root).get("dataset", "unknown")
    data_sha = file_sha256(prepared_root / "train.npz")
    manifest_sha = file_sha256(prepared_root / MANIFEST)
    fingerprint = hashlib.sha256(
        json.dumps([asdict(cfg), data_sha, manifest_sha], sort_keys=True, default=list).encode()
    ).hexdigest()

    train_idx, held_idx = split_heldout(split.labels, cfg.heldout_fraction, cfg.seed)
    images = torch.from_numpy(split.images)
    labels = torch.from_numpy(split.labels.astype(np.int64))
    wrn = WRNConfig(
        cfg.depth, cfg.width, cfg.strides, cfg.dropout, split.images.shape[-1], len(split.classes)
    )
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        model = WideResNet(wrn, *channel_stats(split.images, train_idx))
    if dist.distributed and sync_bn:
        model = sync_batchnorm(model, device)
    model = model.to(device, memory_format=torch.channels_last)
    weights = [p for p in model.parameters() if p.ndim > 1]
    others = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD(
        [{"params": weights}, {"params": others, "weight_decay": 0.0}],
        lr=cfg.lr,
        momentum=cfg.momentum,
        nesterov=cfg.nesterov,
        weight_decay=cfg.weight_decay,
    )

    start, elapsed, history = 0, 0.0, []
    best = {"heldout_acc": -1.0, "epoch": 0, "model": None}
    resume_path = Path(resume_path) if resume_path is not None else None
    state = None
    if resume_path is not None and dist.is_main:
        state = _load_resume(resume_path, fingerprint)
    state = dist.broadcast(state)  # rank 0's resume state on every rank
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["epoch"], state["wall_seconds"]
        history, best = state["history"], state["best"]
    log_rows(live, history, step_key="epoch")
    net = model
    if dist.distributed:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)

    bar = tqdm(
        range(start, cfg.epochs),
        initial=start,
        total=cfg.epochs,
        desc="pretrain",
        disable=None if dist.is_main else True,
    )
    for epoch in bar:
        loss, acc = train_epoch(net, optimizer, images, labels, train_idx, cfg, epoch, dist)
        dist.sync_buffers(model)  # without synchronised batch norm the ranks' statistics differ
        held = accuracy(model, images, labels, held_idx, cfg.eval_batch_size, dist)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "train_acc": acc,
            "heldout_acc": held,
            "lr": lr_at(cfg, epoch),
        }
        history.append(row)
        log_row(live, row, step_key="epoch")
        if held > best["heldout_acc"]:
            best = {"heldout_acc": held, "epoch": epoch + 1, "model": _cpu_state(model)}
        bar.set_postfix(loss=f"{loss:.3f}", heldout=f"{held:.3f}")
        if bar.disable and dist.is_main:
            print(
                f"pretrain epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f} train_acc {acc:.4f} "
                f"heldout_acc {held:.4f}",
                file=sys.stderr,
            )
        if resume_path is not None and dist.is_main:
            resume = {
                "fingerprint": fingerprint,
                "epoch": epoch + 1,
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "best": best,
                "history": history,
                "wall_seconds": elapsed + time.perf_counter() - t0,
            }
            write_torch(resume_path, resume)
        if stop_after is not None and epoch + 1 >= stop_after:
            bar.close()
            return {"stopped_after": epoch + 1, "history": history}
    bar.close()

    model.load_state_dict(best["model"])
    train_acc = accuracy(model, images, labels, train_idx, cfg.eval_batch_size, dist)
    metrics = {
        "backbone_heldout_accuracy": best["heldout_acc"],
        "backbone_train_accuracy": train_acc,
        "epochs": cfg.epochs,
        "best_epoch": best["epoch"],
        "wall_seconds": elapsed + time.perf_counter() - t0,
        "num_classes": len(split.classes),
        "feature_dim": wrn.feature_dim,
        "num_train_images": len(train_idx),
        "num_heldout_images": len(held_idx),
        "device": device.type,
        "processes": dist.world_size,
    }
    if not dist.is_main:
        return {**metrics, "history": history}
    ckpt = backbone_checkpoint(
        model,
        dataset=dataset,
        classes=list(split.classes),
        image_size=list(split.images.shape[1:3]),
        train_sha256=data_sha,
        manifest_sha256=manifest_sha,
        pretrain_config=json.dumps(asdict(cfg), default=list),
        metrics={k: v for k, v in metrics.items() if k not in RUN_ONLY},
    )
    write_torch(out_dir / BACKBONE_FILE, ckpt)
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    return {**metrics, "history": history}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
