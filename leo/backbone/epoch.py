"""One epoch of supervised pre-training: the schedule, the SGD step, the pass, accuracy.

:func:`train_epoch` walks the epoch's seeded permutation in global batches of
``cfg.batch_size``; with several processes (a distributed
:class:`~leo.backbone.distributed.Dist`) each rank takes its rows of every global batch
(:func:`~leo.backbone.distributed.batch_rows`), with the augmentation one process would draw
for them, and the losses are scaled so that DistributedDataParallel's average gradient is
that of the global batch's mean loss. :func:`accuracy` splits its images across ranks and
sums the counts. With one process every operation is that of a plain single-device loop.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from leo.backbone.augment import augment
from leo.backbone.distributed import Dist, batch_rows, scaled_loss
from leo.backbone.wrn import WideResNet, to_input

if TYPE_CHECKING:
    from leo.backbone.pretrain import PretrainConfig


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
    dist: Dist | None = None,
    global_n: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One SGD step on a batch; returns (summed loss, number correct) of this process's rows,
    both 0-d tensors.

    Args:
        model: the network, wrapped in DistributedDataParallel when ``dist`` is distributed.
        x: augmented images ``(b, C, H, W)`` in [0, 1]: the batch, or this rank's rows of it.
        y: int64 labels ``(b,)``.
        dist: the processes (None: one).
        global_n: rows of the global batch (used when ``dist`` is distributed).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        logits = model(x)
    if dist is not None and dist.distributed:
        loss = scaled_loss(logits.float(), y, global_n, dist)
        summed = loss.detach() * (global_n / dist.world_size)
    else:
        loss = F.cross_entropy(logits.float(), y)
        summed = loss.detach() * len(y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return summed, (logits.argmax(1) == y).sum()


@torch.inference_mode()
def accuracy(
    model: WideResNet,
    images: torch.Tensor,
    labels: torch.Tensor,
    idx: np.ndarray,
    batch_size: int,
    dist: Dist | None = None,
) -> float:
    """Eval-mode accuracy on ``images[idx]`` (uint8 ``(n, H, W, C)`` on the CPU), batched.

    With several processes each rank scores ``idx[rank::W]`` and the counts are summed.
    """
    if dist is not None and dist.distributed:
        idx = idx[dist.rank :: dist.world_size]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for s in range(0, len(idx), batch_size):
        b = idx[s : s + batch_size]
        x = to_input(images[b], device).contiguous(memory_format=torch.channels_last)
        correct += int((model(x).argmax(1).cpu() == labels[b]).sum())
    model.train(was_training)
    if dist is not None and dist.distributed:
        correct, count = dist.sum(correct, len(idx))
        return correct / max(count, 1)
    return correct / max(len(idx), 1)


def train_epoch(
    model: WideResNet,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    train_idx: np.ndarray,
    cfg: PretrainConfig,
    epoch: int,
    dist: Dist | None = None,
) -> tuple[float, float]:
    """One pass over ``images[train_idx]`` in a seeded random order, with augmentation.

    All randomness (order, augmentation, dropout) comes from ``(cfg.seed, epoch)`` (dropout
    also from the rank); the global RNG state is restored afterwards.

    Args:
        model: the network (DistributedDataParallel-wrapped when ``dist`` is distributed).
        images: uint8 ``(n, H, W, C)`` on the CPU; labels: int64 ``(n,)``.
        train_idx: the indices trained on.
        epoch: 0-based epoch (the learning rate follows ``lr_at(cfg, epoch + step / steps)``).
        dist: the processes (None: one); each trains on its rows of every global batch.

    Returns:
        (mean training loss, training accuracy) over the epoch, under augmentation, summed
        over all processes.
    """
    device = next(model.parameters()).device
    amp = cfg.amp and device.type == "cuda"
    steps = math.ceil(len(train_idx) / cfg.batch_size)
    parallel = dist is not None and dist.distributed
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        gen = _seed_epoch(cfg.seed, epoch, dist.rank if parallel else 0)
        order = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for step in range(steps):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            lr = lr_at(cfg, epoch + step / steps)
            if parallel:
                rows = batch_rows(len(idx), dist.rank, dist.world_size)
                x = to_input(images[idx[rows]], device)
                x = augment(x, cfg.augment, cfg.pad, gen, torch.from_numpy(rows), len(idx))
                y = labels[idx[rows]].to(device)
            else:
                x = augment(to_input(images[idx], device), cfg.augment, cfg.pad, gen)
                y = labels[idx].to(device)
            x = x.contiguous(memory_format=torch.channels_last)
            loss_b, correct_b = train_step(model, optimizer, x, y, lr, amp, dist, len(idx))
            loss_sum += loss_b
            correct += correct_b
    if parallel:
        total_loss, total_correct = dist.sum(float(loss_sum), int(correct))
        return total_loss / len(train_idx), int(total_correct) / len(train_idx)
    return float(loss_sum) / len(train_idx), int(correct) / len(train_idx)


def _seed_epoch(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Seed the global CPU/CUDA RNGs (dropout; rank 0 as one process, other ranks apart) and
    return the epoch's data generator (the same on every rank)."""
    epoch_seed = (seed * 1_000_003 + epoch) % (2**63)
    if rank:
        dropout_seed = int(np.random.SeedSequence([epoch_seed, rank]).generate_state(1)[0])
    torch.manual_seed(dropout_seed if rank else epoch_seed)  # callers wrap the epoch in fork_rng
    return torch.Generator().manual_seed(epoch_seed)
