"""Stage ``pretrain``: supervised pre-training of the WRN feature extractor.

Reads ``base`` (seed, dataset) and ``pretrain`` from ``params.yaml``: the common keys
``device``, ``heldout_fraction``, ``eval_batch_size``, the data-parallel keys and the preset
named by ``base.dataset`` (architecture and optimisation). Reads only
``data/prepared/{manifest.json,train.npz}``; writes ``data/pretrain/backbone.pt`` and the
DVCLive log ``reports/pretrain/`` (:mod:`leo.utils.live`): ``plots/metrics/<column>.tsv``,
one row per epoch, and ``metrics.json``, the last epoch plus the run's metrics. A kill leaves
``tmp/pretrain/resume.pt`` (outside DVC's outs, which DVC clears before a run); the next
run with the same params and data continues from the last finished epoch.

With ``pretrain.processes_per_node x pretrain.nodes > 1`` the stage starts torchrun
(:mod:`leo.backbone.launch`), which runs ``python -m stages.pretrain --worker`` once per
process (DistributedDataParallel, :mod:`leo.backbone.distributed`); rank 0 runs on this
machine and writes everything above. The stage exits with the workers' status and, on
failure, one line on stderr (their output goes to stdout).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from leo.backbone.distributed import Dist, check_processes, init_distributed
from leo.backbone.launch import Launch, node_command, run_torchrun
from leo.backbone.pretrain import PretrainConfig, pretrain
from leo.utils.device import resolve_device
from leo.utils.errors import LeoInputError
from leo.utils.live import open_live
from stages.common import PREPARED, REPORTS, settings, stage_main, where

OUT = Path("data/pretrain")
RESUME = Path("tmp/pretrain/resume.pt")
COLLECTIVE_TIMEOUT_S = 1800.0  # a collective waiting this long means a rank is gone


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``--worker``: run as one of torchrun's processes (the stage starts them itself);
    ``--node-command RANK``: print the torchrun command of machine ``RANK`` and exit."""
    parser = argparse.ArgumentParser(prog="python -m stages.pretrain", description=__doc__)
    parser.add_argument(
        "--worker", action="store_true", help="run as one torchrun process (set by the stage)"
    )
    parser.add_argument(
        "--node-command",
        type=int,
        metavar="RANK",
        help="print the torchrun command that machine RANK (1, 2, ...) runs to join, and exit",
    )
    return parser.parse_args(argv)


def run(cfg: PretrainConfig, dist: Dist | None = None, sync_bn: bool = True) -> None:
    """Pre-train in this process (one rank of ``dist``, or alone) and log on rank 0."""
    main_rank = dist is None or dist.is_main
    if dist is None:
        device = resolve_device(settings().pretrain.device, f"{where()}: pretrain.device")
    else:
        device = dist.device
    live = open_live(REPORTS / "pretrain") if main_rank else None  # a resumed run refills it
    metrics = pretrain(
        PREPARED, OUT, cfg, device, resume_path=RESUME, live=live, dist=dist, sync_bn=sync_bn
    )
    if not main_rank:
        return
    metrics.pop("history")
    live.summary.update(metrics)
    live.end()  # metrics.json
    print(
        f"pretrain: held-out accuracy {metrics['backbone_heldout_accuracy']:.4f} "
        f"(epoch {metrics['best_epoch']}/{metrics['epochs']}), {metrics['wall_seconds']:.0f} s"
        f" on {metrics['processes']} process{'es' if metrics['processes'] > 1 else ''}"
    )


def launch_settings() -> Launch:
    """The torchrun launch ``params.yaml`` asks for, checked before anything starts.

    Raises:
        LeoInputError: ``cuda:<i>`` with several processes, more processes per machine than
            CUDA devices, or a global batch the processes do not divide.
    """
    params, key = settings(), f"{where()}: pretrain"
    p = params.pretrain
    nodes, per_node = p.nodes, p.processes_per_node
    launch = Launch("stages.pretrain", per_node, nodes, p.rdzv_endpoint, p.rdzv_timeout_s)
    if launch.world_size == 1:
        return launch
    device = resolve_device(p.device, f"{key}.device")
    if device.index is not None:
        raise LeoInputError(f"{key}.device: {p.device!r} with several processes; use cuda")
    cuda = torch.cuda.device_count() if device.type == "cuda" else 0
    check_processes(device, p.processes_per_node, f"{key}.processes_per_node", cuda)
    batch = params.pretrain_config().batch_size
    if batch % launch.world_size:
        raise LeoInputError(
            f"{key}.{params.base.dataset}.batch_size: {batch} is not divisible by the "
            f"{launch.world_size} processes (processes_per_node x nodes)"
        )
    return launch


@stage_main
def main() -> None:
    """Run the stage in the current directory."""
    args = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
    params = settings()
    cfg = params.pretrain_config()
    if args.worker:
        p, key = params.pretrain, f"{where()}: pretrain"
        world = p.processes_per_node * p.nodes
        dist = init_distributed(
            p.device,
            f"{key}.device",
            world,
            COLLECTIVE_TIMEOUT_S,
            f"{key}.processes_per_node x nodes",
        )
        try:
            run(cfg, dist, params.pretrain.sync_batchnorm)
        finally:
            dist.close()
        return
    launch = launch_settings()
    if args.node_command is not None:
        if not 0 <= args.node_command < launch.nodes:
            raise LeoInputError(
                f"--node-command: {args.node_command} is not a machine rank of "
                f"{where()}: pretrain.nodes = {launch.nodes} (0 .. {launch.nodes - 1})"
            )
        print(shlex.join(["torchrun", *node_command(launch, args.node_command)[3:]]))
        return
    if launch.world_size == 1:
        run(cfg)
        return
    code, line = run_torchrun(launch, f"{where()}: pretrain")
    if code:
        print(f"error: {line}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
