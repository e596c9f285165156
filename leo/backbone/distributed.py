"""Data parallelism for the backbone stages: one process per device, launched by torchrun.

A stage that runs on ``W > 1`` processes (:mod:`leo.backbone.launch` starts them) calls
:func:`init_distributed` in every process: it reads torchrun's environment (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), takes ``cuda:<LOCAL_RANK>`` with the
NCCL backend on GPUs or the CPU with gloo, and returns a :class:`Dist`. A single process
uses :meth:`Dist.single`, on which every collective is the identity, so the same code path
serves one process and many.

Sharding (:func:`batch_rows`): every rank walks the same seeded permutation of the epoch and
takes rows ``rank, rank + W, ...`` of each *global* batch. That is the stride of
``torch.utils.data.DistributedSampler`` applied per global batch instead of per epoch, and
without its padding: the union of the ranks' rows at step ``s`` is exactly the batch a single
process trains on at step ``s``, the last, partial batch included, and the permutation comes
from the epoch generator that also draws the augmentation (which keeps a one-process run
bit-identical to the code before data parallelism existed).

Batch norm across processes (:func:`sync_batchnorm`): ``torch.nn.SyncBatchNorm`` on GPUs; on
the CPU, where it refuses to run, :class:`GlobalBatchNorm2d` computes the same statistics
(mean and biased variance over every rank's rows, two differentiable all-reduces) in plain
tensor code, so the gloo path trains the same model as one process and can be tested.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from leo.backbone.launch import die_with_parent
from leo.utils.device import resolve_device
from leo.utils.errors import LeoInputError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@dataclass(frozen=True)
class Dist:
    """This process's place among the data-parallel processes.

    Attributes:
        rank: global rank in ``[0, world_size)``; rank 0 writes every file.
        world_size: number of processes W.
        local_rank: rank on this machine (the CUDA device index on GPUs).
        device: the device this process trains on.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def single(cls, device: torch.device | str = "cpu") -> Dist:
        """One process: every collective below is the identity."""
        return cls(0, 1, 0, torch.device(device))

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the process that writes files and logs."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def sum(self, *values: float) -> list[float]:
        """The sums over all ranks of each of ``values`` (float64: counts stay exact)."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled; for trusted in-run objects only)."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (same shape and dtype on every rank), in rank order."""
        if not self.distributed:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return out

    def sync_buffers(self, model: nn.Module) -> None:
        """Give every rank rank 0's buffers (batch-norm running statistics)."""
        if self.distributed:
            for buf in model.buffers():
                dist.broadcast(buf, src=0)

    def close(self) -> None:
        """Leave the process group (no-op for a single process)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """Whether torchrun's rank variables are all set in this process's environment."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def init_distributed(
    device: str, what: str, world_size: int, timeout_s: float = 600.0, world_key: str = ""
) -> Dist:
    """Join the process group torchrun set up; one device per local rank.

    Args:
        device: the device setting (``auto``, ``cpu`` or ``cuda``): CUDA -> NCCL on
            ``cuda:<LOCAL_RANK>``; CPU -> gloo.
        what: how to name the setting in errors (``"params.yaml: pretrain.device"``).
        world_size: the number of processes the params ask for (torchrun's must match).
        timeout_s: timeout of every collective (a rank that died stops the others).
        world_key: how to name the params that set ``world_size``, for the error.

    Raises:
        LeoInputError: not launched by torchrun, another number of processes than
            ``world_size``, ``cuda:<i>`` asked for, or fewer CUDA devices than local processes.
    """
    if not launched_by_torchrun():
        raise LeoInputError(f"not launched by torchrun ({', '.join(TORCHRUN_ENV)} unset)")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ["LOCAL_WORLD_SIZE"])
    if world != world_size:
        raise LeoInputError(
            f"{world_key or what}: {world_size} processes asked for, torchrun started {world}"
        )
    die_with_parent()  # a killed torchrun leaves no worker behind
    dev = resolve_device(device, what)
    if dev.type == "cuda":
        if dev.index is not None:
            raise LeoInputError(
                f"{what}: {device!r} with several processes; use cuda (one device per process)"
            )
        check_processes(dev, local_world, what, torch.cuda.device_count())
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return Dist(rank, world, local_rank, dev)


def check_processes(device: torch.device, processes: int, what: str, cuda_devices: int) -> None:
    """Refuse more processes per machine than CUDA devices (on the CPU any number runs).

    Raises:
        LeoInputError: ``processes > cuda_devices`` on CUDA, in one line naming ``what``.
    """
    if device.type == "cuda" and processes > cuda_devices:
        raise LeoInputError(
            f"{what}: {processes} processes per machine but {cuda_devices} CUDA device"
            f"{'s' if cuda_devices != 1 else ''} here (one process per device)"
        )


def batch_rows(n: int, rank: int, world_size: int) -> np.ndarray:
    """The rows of a global batch of ``n`` rows that rank ``rank`` of ``world_size`` takes.

    Returns:
        int64 ``(ceil((n - rank) / world_size),)``: ``rank, rank + W, ...``; over all ranks
        a partition of ``range(n)``.
    """
    return np.arange(rank, n, world_size, dtype=np.int64)


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics are those of all ranks' rows together.

    The math of ``torch.nn.SyncBatchNorm`` for the CPU (gloo), where that class refuses to
    run: the mean and the biased variance over every rank's rows normalise the batch, the
    running variance gets the unbiased one, and gradients flow through the two all-reduces
    (the functional ``all_reduce`` of ``torch.distributed._functional_collectives``, which
    torch recommends over the deprecated ``torch.distributed.nn``; its backward all-reduces
    the incoming gradients), so each rank's gradient holds its rows' share of every rank's
    loss. Outside
    a process group of several ranks, or in eval mode, it is ``BatchNorm2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``; ``B`` may differ between ranks, even be 0."""
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed._functional_collectives import all_reduce

        c, world = x.shape[1], dist.group.WORLD
        count = torch.tensor([x.numel() // c], dtype=x.dtype, device=x.device)
        total = all_reduce(torch.cat([x.sum(dim=(0, 2, 3)), count]), "sum", world)
        n = total[c]
        mean = total[:c] / n
        centred = x - mean[None, :, None, None]
        var = all_reduce(centred.square().sum(dim=(0, 2, 3)), "sum", world) / n
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                if m is None:  # cumulative moving average, as BatchNorm2d
                    m = 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * n / torch.clamp(n - 1, min=1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def _to_global_bn(module: nn.Module) -> nn.Module:
    """``module`` with every ``BatchNorm2d`` replaced by a :class:`GlobalBatchNorm2d` that
    holds the same parameter and buffer objects (an optimizer built before still applies)."""
    out = module
    if type(module) is nn.BatchNorm2d:
        out = GlobalBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(out, name, getattr(module, name))
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _to_global_bn(child))
    return out


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch-norm statistics over all processes: ``torch.nn.SyncBatchNorm`` on CUDA,
    :class:`GlobalBatchNorm2d` on the CPU; parameters and buffers are kept, not copied."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _to_global_bn(model)


def scaled_loss(logits: torch.Tensor, y: torch.Tensor, global_n: int, d: Dist) -> torch.Tensor:
    """The loss whose DDP-averaged gradient is that of the mean loss over the global batch.

    DDP averages the ranks' gradients; a rank holding ``b`` of the ``global_n`` rows
    contributes ``W / global_n`` times its summed cross-entropy, so the average is the mean
    over all ``global_n`` rows whatever the split (the last batch may split unevenly).

    Args:
        logits: ``(b, classes)`` float logits of this rank's rows; y: int64 ``(b,)``.
    """
    return F.cross_entropy(logits, y, reduction="sum") * (d.world_size / global_n)
