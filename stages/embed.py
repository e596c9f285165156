"""Stage ``embed``: the frozen pre-trained WRN over every prepared split, into Parquet.

Reads ``base`` and ``embed`` (``batch_size``, ``device``) from ``params.yaml``, the
prepared dataset ``data/prepared/`` and the backbone ``data/pretrain/backbone.pt``;
writes ``data/embeddings/{train,val,test}.parquet``.
"""

from __future__ import annotations

from pathlib import Path

from leo.backbone.embed import embed_splits
from leo.backbone.pretrain import resolve_device
from stages.common import PARAMS_FILE, load_params, require, stage_main

PREPARED = Path("data/prepared")
BACKBONE = Path("data/pretrain/backbone.pt")
OUT = Path("data/embeddings")


@stage_main
def main() -> None:
    """Run the stage in the current directory."""
    params = load_params("embed")
    batch_size = require(params, "batch_size", int, "embed")
    device = resolve_device(
        require(params, "device", str, "embed"), f"{PARAMS_FILE}: key 'embed.device'"
    )
    info = embed_splits(PREPARED, BACKBONE, OUT, device, batch_size)
    rows = ", ".join(f"{s} {n}" for s, n in info["splits"].items())
    print(f"embed: {rows} rows x {info['feature_dim']} in {info['wall_seconds']:.1f} s")


if __name__ == "__main__":
    main()
