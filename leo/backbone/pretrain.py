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
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from leo.atomic import atomic_path
from leo.backbone.augment import AUGMENTATIONS, augment
from leo.backbone.wrn import WideResNet, WRNConfig, backbone_checkpoint, channel_stats, to_input
from leo.data.prepared import MANIFEST, load_manifest, load_prepared_split
from leo.errors import LeoInputError

BACKBONE_FILE = "backbone.pt"
SCHEDULES = ("cosine", "step")


@dataclass
class PretrainConfig:
    """Architecture and optimisation of the pre-training.

    Attributes:
        depth: WRN depth d (6n + 4).
        width: WRN widening factor k; features are 64k-d.
        strides: strides of the three groups (paper: three down-sampling steps).
        dropout: dropout rate inside the blocks.
        epochs: passes over the (non-held-out) meta-train images.
        batch_size: images per SGD step.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay (SGD's coupled form).
        schedule: ``cosine`` (to 0 over all iterations) or ``step`` (times ``gamma`` at
            every epoch in ``milestones``).
        milestones: epochs at which the step schedule decays.
        gamma: step-schedule decay factor.
        augment: ``shift`` (Omniglot), ``crop_flip`` (natural images) or ``none``.
        pad: padding (pixels) for the random shift/crop.
        heldout_fraction: fraction of every class's images held out for model selection.
        eval_batch_size: batch size of held-out evaluation.
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        seed: seed of the held-out split and of every epoch's randomness.
    """

    depth: int = 10
    width: int = 2
    strides: tuple[int, int, int] = (2, 2, 2)
    dropout: float = 0.0
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    augment: str = "shift"
    pad: int = 2
    heldout_fraction: float = 0.1
    eval_batch_size: int = 512
    amp: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        """Raises ValueError naming the bad field."""
        self.strides = tuple(int(s) for s in self.strides)
        self.milestones = [int(m) for m in self.milestones]
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {self.augment!r}")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ValueError(f"heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        WRNConfig(self.depth, self.width, self.strides)  # validates depth/width/strides


def resolve_device(name: str, what: str = "device") -> torch.device:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cpu``/``cuda`` as asked.

    Raises:
        LeoInputError: an unknown name, or ``cuda`` without CUDA; the message starts with ``what``.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise LeoInputError(f"{what} must be auto, cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise LeoInputError(f"{what} is 'cuda' but CUDA is not available")
    return torch.device(name)


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


def lr_at(cfg: PretrainConfig, progress: float) -> float:
    """Learning rate after ``progress`` epochs (a float: iteration / iterations-per-epoch)."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress / cfg.epochs, 1.0)))
    return cfg.lr * cfg.gamma ** sum(progress >= m for m in cfg.milestones)


def train_step(
    model: WideResNet,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    amp: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch; returns (summed loss, number correct), both 0-d tensors.

    Args:
        x: augmented images ``(B, C, H, W)`` in [0, 1].
        y: int64 labels ``(B,)``.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach() * len(y), (logits.argmax(1) == y).sum()


@torch.inference_mode()
def accuracy(
    model: WideResNet, images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray, batch_size: int
) -> float:
    """Eval-mode accuracy on ``images[idx]`` (uint8 ``(n, H, W, C)`` on the CPU), batched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        x = to_input(images[b], device).contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1).cpu() == labels[b]).sum())
    model.train(was_training)
    return correct / max(len(idx), 1)


def train_epoch(
    model: WideResNet,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    train_idx: np.ndarray,
    cfg: PretrainConfig,
    epoch: int,
) -> tuple[float, float]:
    """One pass over ``images[train_idx]`` in a seeded random order, with augmentation.

    All randomness (order, augmentation, dropout) comes from ``(cfg.seed, epoch)``; the
    global RNG state is restored afterwards.

    Args:
        images: uint8 ``(n, H, W, C)`` on the CPU; labels: int64 ``(n,)``.
        train_idx: the indices trained on.
        epoch: 0-based epoch (the learning rate follows ``lr_at(cfg, epoch + step / steps)``).

    Returns:
        (mean training loss, training accuracy) over the epoch, under augmentation.
    """
    device = next(model.parameters()).device
    amp = cfg.amp and device.type == "cuda"
    steps = math.ceil(len(train_idx) / cfg.batch_size)
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        gen = _seed_epoch(cfg.seed, epoch)
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = augment(to_input(images[idx], device), cfg.augment, cfg.pad, gen)
            x = x.contiguous(memory_format=torch.channels_last)
            y = labels[idx].to(device)
            lr = lr_at(cfg, epoch + step / steps)
            loss_b, correct_b = train_step(model, optimizer, x, y, lr, amp)
            loss_sum += loss_b
            correct += correct_b
    return float(loss_sum) / len(train_idx), int(correct) / len(train_idx)


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 8 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _seed_epoch(seed: int, epoch: int) -> torch.Generator:
    """Seed the global CPU/CUDA RNGs (dropout) and return the epoch's data generator."""
    epoch_seed = (seed * 1_000_003 + epoch) % (2**63)
    torch.manual_seed(epoch_seed)  # callers wrap the epoch in torch.random.fork_rng
    return torch.Generator().manual_seed(epoch_seed)


def _save(obj: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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

    Returns:
        Metrics: ``backbone_heldout_accuracy`` (best over epochs, the selected model),
        ``backbone_train_accuracy`` (the selected model in eval mode on the non-held-out
        images), ``epochs``, ``best_epoch``, ``wall_seconds`` (summed over resumed runs),
        ``num_classes``, ``feature_dim``, image counts, ``device``, and ``history`` (one
        dict per epoch: epoch, train_loss, train_acc, heldout_acc, lr at the epoch start).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
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
    state = _load_resume(resume_path, fingerprint) if resume_path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, elapsed = state["epoch"], state["wall_seconds"]
        history, best = state["history"], state["best"]

    bar = tqdm(
        range(start, cfg.epochs), initial=start, total=cfg.epochs, desc="pretrain", disable=None
    )
    for epoch in bar:
        loss, acc = train_epoch(model, optimizer, images, labels, train_idx, cfg, epoch)
        held = accuracy(model, images, labels, held_idx, cfg.eval_batch_size)
        row = {
            "epoch": epoch + 1,
            "train_loss": loss,
            "train_acc": acc,
            "heldout_acc": held,
            "lr": lr_at(cfg, epoch),
        }
        history.append(row)
        if held > best["heldout_acc"]:
            best = {"heldout_acc": held, "epoch": epoch + 1, "model": _cpu_state(model)}
        bar.set_postfix(loss=f"{loss:.3f}", heldout=f"{held:.3f}")
        if bar.disable:
            print(
                f"pretrain epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f} train_acc {acc:.4f} "
                f"heldout_acc {held:.4f}",
                file=sys.stderr,
            )
        if resume_path is not None:
            resume = {
                "fingerprint": fingerprint,
                "epoch": epoch + 1,
                "model": _cpu_state(model),
                "optimizer": optimizer.state_dict(),
                "best": best,
                "history": history,
                "wall_seconds": elapsed + time.perf_counter() - t0,
            }
            _save(resume, resume_path)
        if stop_after is not None and epoch + 1 >= stop_after:
            bar.close()
            return {"stopped_after": epoch + 1, "history": history}
    bar.close()

    model.load_state_dict(best["model"])
    metrics = {
        "backbone_heldout_accuracy": best["heldout_acc"],
        "backbone_train_accuracy": accuracy(model, images, labels, train_idx, cfg.eval_batch_size),
        "epochs": cfg.epochs,
        "best_epoch": best["epoch"],
        "wall_seconds": elapsed + time.perf_counter() - t0,
        "num_classes": len(split.classes),
        "feature_dim": wrn.feature_dim,
        "num_train_images": len(train_idx),
        "num_heldout_images": len(held_idx),
        "device": device.type,
    }
    ckpt = backbone_checkpoint(
        model,
        dataset=dataset,
        classes=list(split.classes),
        image_size=list(split.images.shape[1:3]),
        train_sha256=data_sha,
        manifest_sha256=manifest_sha,
        pretrain_config=json.dumps(asdict(cfg), default=list),
        metrics={k: v for k, v in metrics.items() if k != "device"},
    )
    _save(ckpt, out_dir / BACKBONE_FILE)
    if resume_path is not None:
        resume_path.unlink(missing_ok=True)
    return {**metrics, "history": history}


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
