"""Batched, seeded data augmentation for supervised pre-training (on the batch's device).

- ``crop_flip`` (natural images): pad by ``pad`` with zeros, take a random ``H x W`` crop,
  flip horizontally with probability 1/2 (the standard CIFAR/miniImageNet recipe).
- ``shift`` (Omniglot): pad by ``pad`` replicating the border (the background), random
  ``H x W`` crop = a random shift of up to ``pad`` pixels; no flip (characters have a
  handedness).
- ``none``: identity.

Distributed training passes ``rows``: the tensor holds only those rows of a global batch of
``total`` images; the random numbers are drawn for all ``total`` in the order one process
draws them, and those of ``rows`` are applied, so every image gets the same augmentation
whatever the number of processes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("crop_flip", "shift", "none")


def _draw(draw: torch.Tensor, rows: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The drawn values of ``rows`` (all of them for None), on ``device``."""
    return (draw if rows is None else draw[rows]).to(device)


def random_crop(
    x: torch.Tensor,
    pad: int,
    mode: str,
    generator: torch.Generator,
    rows: torch.Tensor | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Pad and take one random crop of the original size per image.

    Args:
        x: images ``(B, C, H, W)``.
        pad: padding on each side; offsets are uniform in ``[0, 2 * pad]``.
        mode: ``"constant"`` (zeros) or ``"replicate"``.
        generator: CPU generator for the offsets.
        rows, total: ``x`` holds rows ``rows`` (int64 ``(B,)``) of a batch of ``total``
            (None: ``x`` is the whole batch).

    Returns:
        ``(B, C, H, W)``.
    """
    if pad <= 0:
        return x
    b, _, h, w = x.shape
    n = b if rows is None else total
    padded = F.pad(x, (pad, pad, pad, pad), mode=mode)
    dy = _draw(torch.randint(0, 2 * pad + 1, (n,), generator=generator), rows, x.device)
    dx = _draw(torch.randint(0, 2 * pad + 1, (n,), generator=generator), rows, x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    bidx = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices on dims 0, 2, 3 around a slice: the result is (B, H, W, C).
    out = padded[bidx, :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)  # a channels-last view


def random_hflip(
    x: torch.Tensor,
    generator: torch.Generator,
    rows: torch.Tensor | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Flip each image ``(B, C, H, W)`` left-right with probability 1/2 (``rows``, ``total``:
    as :func:`random_crop`)."""
    n = x.shape[0] if rows is None else total
    flip = _draw(torch.rand(n, generator=generator) < 0.5, rows, x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(
    x: torch.Tensor,
    kind: str,
    pad: int,
    generator: torch.Generator,
    rows: torch.Tensor | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Apply augmentation ``kind`` (one of :data:`AUGMENTATIONS`) to images ``(B, C, H, W)``
    (``rows``, ``total``: as :func:`random_crop`)."""
    if kind == "none":
        return x
    if kind == "shift":
        return random_crop(x, pad, "replicate", generator, rows, total)
    if kind == "crop_flip":
        cropped = random_crop(x, pad, "constant", generator, rows, total)
        return random_hflip(cropped, generator, rows, total)
    raise ValueError(f"unknown augmentation {kind!r}; expected one of {AUGMENTATIONS}")
