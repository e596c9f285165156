"""Frozen feature extraction: every prepared split through the pre-trained WRN into Parquet.

The best pre-training checkpoint runs in eval mode (batch-norm running statistics, no
dropout, no augmentation) under ``torch.inference_mode``; its ``(n, 64k)`` pooled features
go to ``<out>/<split>.parquet`` through :mod:`leo.data.store`, with provenance naming the
dataset, the class-split file of the manifest and its sha256, the prepared ``<split>.npz``
and its sha256, the backbone checkpoint's and the prepared manifest's sha256, and the
feature dimension. Embeddings are stored un-normalised; the
store L2-normalises on read (docs/model.md, "Problem and evaluation protocol": inputs
are L2-normalised before use).

Across processes (``dist``, :mod:`leo.backbone.distributed`): the batches of ``batch_size``
images are dealt out round-robin, batch ``i`` to rank ``i mod W``; each round every rank
embeds its batch and rank 0 gathers the features (``all_gather`` of padded batches) and writes
the files. Every image goes through the same batch, of the same size and content, as with
one process, so the features (and the files) are those of one process.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from leo.backbone.distributed import Dist
from leo.backbone.wrn import WideResNet, load_backbone, to_input
from leo.data.prepared import MANIFEST, SPLITS, load_manifest, load_prepared_split
from leo.data.store import write_embeddings
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256


@torch.inference_mode()
def embed_images(
    model: WideResNet,
    images: np.ndarray,
    batch_size: int,
    desc: str = "embed",
    dist: Dist | None = None,
) -> np.ndarray | None:
    """Features of uint8 images ``(n, H, W, C)`` -> float32 ``(n, 64k)`` (model in eval mode).

    With several processes (``dist``) every rank embeds every ``W``-th batch; rank 0 returns
    all the features, the other ranks None.
    """
    model.eval()
    device = next(model.parameters()).device
    if dist is not None and dist.distributed:
        return _embed_shared(model, images, batch_size, desc, dist)
    out = np.empty((len(images), model.config.feature_dim), np.float32)
    starts = range(0, len(images), batch_size)
    for s in tqdm(starts, desc=desc, disable=None, leave=False):
        x = to_input(images[s : s + batch_size], device)
        out[s : s + batch_size] = model.features(x).float().cpu().numpy()
    return out


def _embed_shared(
    model: WideResNet, images: np.ndarray, batch_size: int, desc: str, dist: Dist
) -> np.ndarray | None:
    """:func:`embed_images` across ranks: round ``r`` embeds batches ``rW .. rW + W - 1``."""
    device, world = next(model.parameters()).device, dist.world_size
    n, dim = len(images), model.config.feature_dim
    out = np.empty((n, dim), np.float32) if dist.is_main else None
    batches = math.ceil(n / batch_size)
    rounds = range(0, batches, world)
    for first in tqdm(rounds, desc=desc, disable=None if dist.is_main else True, leave=False):
        mine = first + dist.rank
        feats = torch.zeros((batch_size, dim), dtype=torch.float32, device=device)
        if mine < batches:
            x = to_input(images[mine * batch_size : (mine + 1) * batch_size], device)
            f = model.features(x).float()
            feats[: len(f)] = f
        gathered = dist.all_gather(feats)
        if out is not None:
            for b, f in enumerate(gathered, start=first):
                if b < batches:
                    rows = out[b * batch_size : (b + 1) * batch_size]
                    rows[:] = f[: len(rows)].cpu().numpy()
    return out


def embed_splits(
    prepared_root: str | Path,
    backbone_path: str | Path,
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    dist: Dist | None = None,
) -> dict:
    """Embed every split listed in the prepared manifest and write one Parquet file each.

    Args:
        prepared_root: prepared dataset directory.
        backbone_path: ``backbone.pt`` written by the pretrain stage.
        out_dir: output directory for ``<split>.parquet`` (rank 0 writes; other ranks may
            pass None).
        device: torch device (with ``dist``: its device).
        batch_size: images per forward pass.
        dist: the processes sharing the work (None: this one alone).

    Returns:
        ``{"feature_dim": D, "wall_seconds": s, "splits": {split: num_rows}}``.

    Raises:
        LeoInputError: missing inputs, or a backbone pre-trained on another prepared dataset
            or with another number of image channels.
    """
    t0 = time.perf_counter()
    dist = dist or Dist.single(device)
    prepared_root = Path(prepared_root)
    manifest = load_manifest(prepared_root)
    manifest_sha = file_sha256(prepared_root / MANIFEST)
    model, ckpt = load_backbone(backbone_path, dist.device)
    backbone_sha = file_sha256(backbone_path)
    if ckpt.get("manifest_sha256") != manifest_sha:
        raise LeoInputError(
            f"{backbone_path}: pre-trained on another prepared dataset than "
            f"{prepared_root / MANIFEST} (manifest sha256 differs); rerun the pretrain stage"
        )
    channels = manifest.get("channels")
    if channels is not None and channels != model.config.in_channels:
        raise LeoInputError(
            f"{backbone_path}: expects {model.config.in_channels}-channel images, "
            f"{prepared_root / MANIFEST} has {channels}"
        )
    dim = model.config.feature_dim
    rows = {}
    for split in [s for s in SPLITS if s in manifest["splits"]]:
        data = load_prepared_split(prepared_root, split)
        feats = embed_images(model, data.images, batch_size, f"embed {split}", dist)
        rows[split] = len(data.images)
        if not dist.is_main:
            continue
        npz = f"{split}.npz"
        provenance = {
            "dataset": str(manifest.get("dataset", "unknown")),
            "split": split,
            "split_file": manifest.get("split_file"),  # the class split definition, if any
            "split_file_sha256": manifest.get("split_file_sha256"),
            "prepared_file": npz,
            "prepared_sha256": file_sha256(prepared_root / npz),
            "manifest_sha256": manifest_sha,
            "backbone_sha256": backbone_sha,
            "backbone": f"WRN-{model.config.depth}-{model.config.width}",
            "feature_dim": dim,
        }
        write_embeddings(
            Path(out_dir) / f"{split}.parquet",
            split=split,
            class_names=np.asarray(data.classes, dtype=str)[data.labels],
            example_ids=data.ids,
            embeddings=feats,
            provenance=provenance,
        )
        print(f"embed {split}: {len(feats)} rows x {dim}", file=sys.stderr)
    return {"feature_dim": dim, "wall_seconds": time.perf_counter() - t0, "splits": rows}
