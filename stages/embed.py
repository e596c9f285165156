"""Stage ``embed``: the frozen pre-trained WRN over every prepared split, into Parquet.

Reads ``embed`` (``batch_size``, ``device``, ``processes``) from ``params.yaml``, the prepared
dataset ``data/prepared/`` and the backbone ``data/pretrain/backbone.pt``; writes
``data/embeddings/{train,val,test}.parquet``.

With ``embed.processes > 1`` the stage starts torchrun on this machine
(:mod:`leo.backbone.launch`), which runs ``python -m stages.embed --worker`` once per process:
the ranks split the images, rank 0 writes the files (the same bytes as one process). The
stage exits with the workers' status and, on failure, one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from leo.backbone.distributed import Dist, check_processes, init_distributed
from leo.backbone.embed import embed_splits
from leo.backbone.launch import Launch, run_torchrun
from leo.utils.atomic import atomic_dir
from leo.utils.device import resolve_device
from leo.utils.errors import LeoInputError
from stages.common import settings, stage_main, where

PREPARED = Path("data/prepared")
BACKBONE = Path("data/pretrain/backbone.pt")
OUT = Path("data/embeddings")
COLLECTIVE_TIMEOUT_S = 1800.0


def parse_args(argv: list[str]) -> argparse.Namespace:
    """``--worker``: run as one of torchrun's processes (the stage starts them itself)."""
    parser = argparse.ArgumentParser(prog="python -m stages.embed", description=__doc__)
    parser.add_argument(
        "--worker", action="store_true", help="run as one torchrun process (set by the stage)"
    )
    return parser.parse_args(argv)


def run(device: torch.device, batch_size: int, dist: Dist | None = None) -> None:
    """Embed in this process (one rank of ``dist``, or alone); rank 0 writes ``OUT``."""
    if dist is not None and not dist.is_main:
        embed_splits(PREPARED, BACKBONE, None, batch_size=batch_size, dist=dist)
        return
    with atomic_dir(OUT) as tmp:  # all splits appear at once; a kill leaves nothing inside OUT
        info = embed_splits(PREPARED, BACKBONE, tmp, device, batch_size, dist)
    rows = ", ".join(f"{s} {n}" for s, n in info["splits"].items())
    print(f"embed: {rows} rows x {info['feature_dim']} in {info['wall_seconds']:.1f} s")


@stage_main
def main() -> None:
    """Run the stage in the current directory."""
    args = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
    params, key = settings().embed, f"{where()}: embed"
    if args.worker:
        dist = init_distributed(
            params.device,
            f"{key}.device",
            params.processes,
            COLLECTIVE_TIMEOUT_S,
            f"{key}.processes",
        )
        try:
            run(dist.device, params.batch_size, dist)
        finally:
            dist.close()
        return
    device = resolve_device(params.device, f"{key}.device")
    if params.processes == 1:
        run(device, params.batch_size)
        return
    if device.index is not None:
        raise LeoInputError(f"{key}.device: {params.device!r} with several processes; use cuda")
    cuda = torch.cuda.device_count() if device.type == "cuda" else 0
    check_processes(device, params.processes, f"{key}.processes", cuda)
    code, line = run_torchrun(Launch("stages.embed", params.processes), key)
    if code:
        print(f"error: {line}", file=sys.stderr)
        sys.exit(code)


if __name__ == "__main__":
    main()
