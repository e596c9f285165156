"""Wide ResNet WRN-d-k (Zagoruyko & Komodakis, 2016), the LEO feature extractor.

Pre-activation basic blocks (BN-ReLU-conv 3x3, optional dropout, BN-ReLU-conv 3x3), three
groups of ``(d - 4) / 6`` blocks with widths ``16k, 32k, 64k``; the first block of each
group has a configurable stride. The paper's extractor is WRN-28-10 with three
down-sampling steps on 80x80 images (strides ``(2, 2, 2)``: 80 -> 40 -> 20 -> 10) and
640-d global-average-pooled features. Inputs are normalised inside the model with the
per-channel mean/std of the training split, kept as buffers so a checkpoint is
self-contained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from leo.utils.errors import LeoInputError


@dataclass
class WRNConfig:
    """Architecture of a Wide ResNet.

    Attributes:
        depth: d in WRN-d-k; ``(d - 4)`` must be divisible by 6 (blocks per group).
        width: k in WRN-d-k, the widening factor; features are ``64 * k``-d.
        strides: stride of the first block of each of the three groups.
        dropout: dropout rate between the two convolutions of a block (0 = none).
        in_channels: image channels C (1 for Omniglot, 3 for natural images).
        num_classes: outputs of the linear pre-training head.
    """

    depth: int = 28
    width: int = 10
    strides: tuple[int, int, int] = (2, 2, 2)
    dropout: float = 0.0
    in_channels: int = 3
    num_classes: int = 64

    def __post_init__(self) -> None:
        self.strides = tuple(int(s) for s in self.strides)
        if self.depth < 10 or (self.depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1, got {self.depth}")
        if self.width < 1 or len(self.strides) != 3 or min(self.strides) < 1:
            raise ValueError(f"bad WRN width {self.width} or strides {self.strides}")

    @property
    def feature_dim(self) -> int:
        """Dimension of the pooled features, ``64 * k``."""
        return 64 * self.width

    def to_dict(self) -> dict:
        """Plain types only (safe for ``torch.load(weights_only=True)``)."""
        d = asdict(self)
        d["strides"] = list(self.strides)
        return d


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-[dropout]-conv3x3, plus shortcut.

    The shortcut is the identity, or a 1x1 conv of the pre-activated input when the
    width or resolution changes (as in the original WRN code).
    """

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
            if c_in != c_out or stride != 1
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, c_in, H, W) -> (B, c_out, H / stride, W / stride)``."""
        a = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(a)
        h = self.conv1(a)
        h = F.relu(self.bn2(h))
        if self.dropout > 0:
            h = F.dropout(h, p=self.dropout, training=self.training)
        return skip + self.conv2(h)


class WideResNet(nn.Module):
    """WRN-d-k with in-model input normalisation and a linear classification head.

    Args:
        config: the architecture.
        mean: per-channel mean of the training images in [0, 1], shape ``(C,)``.
        std: per-channel std of the training images in [0, 1], shape ``(C,)``.
    """

    def __init__(
        self,
        config: WRNConfig,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        c = config.in_channels
        self.register_buffer("mean", torch.zeros(c) if mean is None else mean.float().clone())
        self.register_buffer("std", torch.ones(c) if std is None else std.float().clone())
        widths = [16, 16 * config.width, 32 * config.width, 64 * config.width]
        n = (config.depth - 4) // 6
        self.conv1 = nn.Conv2d(c, widths[0], 3, padding=1, bias=False)
        blocks = []
        for g in range(3):
            for i in range(n):
                c_in = widths[g] if i == 0 else widths[g + 1]
                stride = config.strides[g] if i == 0 else 1
                blocks.append(BasicBlock(c_in, widths[g + 1], stride, config.dropout))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3])
        self.head = nn.Linear(widths[3], config.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features.

        Args:
            x: float images in [0, 1], ``(B, C, H, W)``.

        Returns:
            ``(B, 64k)`` global-average-pooled activations after the final BN-ReLU.
        """
        x = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        h = self.blocks(self.conv1(x))
        h = F.relu(self.bn(h))
        return h.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, num_classes)`` for images ``(B, C, H, W)`` in [0, 1]."""
        return self.head(self.features(x))


def to_input(images: np.ndarray | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Prepared uint8 images ``(B, H, W, C)`` -> float ``(B, C, H, W)`` in [0, 1] on ``device``."""
    t = torch.as_tensor(images).to(device)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


def channel_stats(
    images: np.ndarray, idx: np.ndarray | None = None, chunk: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std in [0, 1] of uint8 images ``(n, H, W, C)``; each ``(C,)``.

    Args:
        images: uint8 ``(n, H, W, C)``.
        idx: the images to use (default all).
        chunk: images per float64 chunk (bounds the extra memory for large splits).
    """
    idx = np.arange(len(images)) if idx is None else np.asarray(idx)
    c = images.shape[-1]
    total, sq, count = np.zeros(c), np.zeros(c), 0
    for s in range(0, len(idx), chunk):
        x = images[idx[s : s + chunk]].reshape(-1, c).astype(np.float64) / 255.0
        total += x.sum(axis=0)
        sq += np.square(x).sum(axis=0)
        count += len(x)
    mean = total / max(count, 1)
    std = np.maximum(np.sqrt(np.maximum(sq / max(count, 1) - mean**2, 0.0)), 1e-3)
    return torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def backbone_checkpoint(model: WideResNet, **info) -> dict:
    """A self-contained backbone checkpoint: config, weights (incl. mean/std) and ``info``.

    Only tensors and plain types, so it loads with ``torch.load(weights_only=True)``.
    """
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {"format": "leo-wrn-v1", "config": model.config.to_dict(), "model": state, **info}


def load_backbone(path: str | Path, device: torch.device | str = "cpu") -> tuple[WideResNet, dict]:
    """Rebuild the model saved by :func:`backbone_checkpoint`; returns ``(model, checkpoint)``.

    The pickle is read with ``weights_only=True``: it cannot run code. The model is in
    eval mode on ``device``.

    Raises:
        LeoInputError: the file is missing, unreadable or not a backbone checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: no backbone checkpoint (run the pretrain stage first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure is bad input
        reason = type(err).__name__
        raise LeoInputError(f"{path}: not a loadable backbone checkpoint ({reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "leo-wrn-v1":
        raise LeoInputError(f"{path}: not a backbone checkpoint (format != leo-wrn-v1)")
    model = WideResNet(WRNConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt
