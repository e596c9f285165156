"""The few-shot classifier bundle: a directory that holds everything needed to classify images.

Layout (format ``leo-few-shot-classifier``, version :data:`VERSION`)::

    bundle.json     format, version, the leo version that wrote it, preprocessing, the
                    backbone's architecture, the LEO config, provenance, and the sha256
                    of the two weight files
    backbone.pt     the frozen Wide ResNet's state dict (tensors only; its input
                    normalisation is in the ``mean`` / ``std`` buffers)
    leo.pt          LEO's named parameters (tensors only)
    README.md       what the bundle is and how to use it (written from bundle.json)

The weight files are plain ``{name: tensor}`` dicts saved by ``torch.save`` and read with
``torch.load(weights_only=True)``, whose unpickler rebuilds tensors and containers only, so
loading a bundle runs no pickled code. A bundle is written into a temporary directory and
renamed into place (:func:`leo.utils.atomic.atomic_dir`). Reading refuses, with one line, a
directory without ``bundle.json``, another format, another format version, weight files whose
sha256 differs from ``bundle.json``'s, and weights that do not fit the recorded architecture.

Preprocessing (``bundle.json`` ``preprocessing``), the prepare stage's then the embed
stage's: convert to ``L`` (1 channel) or ``RGB`` (3), resize with PIL's Lanczos filter to
``image_size`` when the size differs, scale uint8 to [0, 1], subtract ``mean`` and divide by
``std`` per channel, run the backbone, average-pool, divide by the L2 norm.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leo.backbone.wrn import WideResNet, WRNConfig
from leo.classify.adapt import check_params
from leo.core.config import LEOConfig, config_from_dict
from leo.core.model import Params
from leo.utils.atomic import atomic_dir
from leo.utils.errors import LeoInputError
from leo.utils.hashing import file_sha256

FORMAT = "leo-few-shot-classifier"
VERSION = 1
BUNDLE_JSON = "bundle.json"
BACKBONE_FILE = "backbone.pt"
LEO_FILE = "leo.pt"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the backbone's input.

    Attributes:
        image_size: ``(H, W)`` the images are resized to.
        channels: 1 (``L``) or 3 (``RGB``).
        mean, std: per-channel normalisation of the [0, 1] input (``(C,)`` each).
    """

    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """The ``preprocessing`` entry of ``bundle.json``."""
        return {
            "image_size": list(self.image_size),
            "channels": self.channels,
            "color_mode": "L" if self.channels == 1 else "RGB",
            "resize": "PIL Lanczos (antialiased), only when the size differs",
            "scale": "uint8 / 255",
            "mean": list(self.mean),
            "std": list(self.std),
            "features": "global-average-pooled backbone features divided by their L2 norm",
        }


@dataclass
class Bundle:
    """A loaded bundle.

    Attributes:
        path: the bundle directory.
        backbone: the Wide ResNet, in eval mode on the CPU.
        params: LEO's parameters (CPU tensors).
        config: LEO's config (its evaluation step counts are used).
        preprocessing: see :class:`Preprocessing`.
        provenance: where the model came from (dataset, commit, params hash, accuracy, ...).
        info: the whole ``bundle.json``.
    """

    path: Path
    backbone: WideResNet
    params: Params
    config: LEOConfig
    preprocessing: Preprocessing
    provenance: dict[str, Any]
    info: dict[str, Any]


def write_bundle(
    out_dir: str | os.PathLike,
    *,
    backbone: WideResNet,
    params: Params,
    config: LEOConfig,
    image_size: tuple[int, int],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """Write a bundle directory atomically (it replaces ``out_dir`` whole).

    Args:
        out_dir: the bundle directory.
        backbone: the pre-trained Wide ResNet (its buffers hold the input normalisation).
        params: LEO's parameters, for embeddings of the backbone's feature width.
        config: LEO's config.
        image_size: ``(H, W)`` the backbone was trained on.
        provenance: JSON-able facts about the model's origin.

    Returns:
        The ``bundle.json`` written.

    Raises:
        LeoInputError: LEO parameters that do not fit the config and the feature width.
    """
    dim = backbone.config.feature_dim
    problems = check_params(params, config, dim)
    if problems:
        raise LeoInputError(f"LEO parameters do not fit a {dim}-d backbone: {problems[0]}")
    prep = Preprocessing(
        image_size=(int(image_size[0]), int(image_size[1])),
        channels=backbone.config.in_channels,
        mean=tuple(float(v) for v in backbone.mean.cpu()),
        std=tuple(float(v) for v in backbone.std.cpu()),
    )
    import leo

    info = {
        "format": FORMAT,
        "version": VERSION,
        "leo_version": leo.__version__,
        "preprocessing": prep.to_dict(),
        "backbone": {
            "architecture": f"WRN-{backbone.config.depth}-{backbone.config.width}",
            "config": backbone.config.to_dict(),
            "feature_dim": dim,
            "file": BACKBONE_FILE,
        },
        "leo": {"config": config.to_dict(), "file": LEO_FILE},
        "provenance": provenance,
    }
    with atomic_dir(out_dir) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
        torch.save(state, tmp / BACKBONE_FILE)
        torch.save({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / LEO_FILE)
        info["backbone"]["sha256"] = file_sha256(tmp / BACKBONE_FILE)
        info["leo"]["sha256"] = file_sha256(tmp / LEO_FILE)
        (tmp / BUNDLE_JSON).write_text(json.dumps(info, indent=2) + "\n")
        (tmp / "README.md").write_text(model_card(info))
    return info


def model_card(info: dict[str, Any]) -> str:
    """The bundle's ``README.md``: what it is, how it was made, how to use it."""
    prov = info.get("provenance", {})
    prep = info["preprocessing"]
    acc = prov.get("metatest") or {}
    lines = [
        f"# LEO few-shot classifier ({prov.get('dataset', 'unknown dataset')}, "
        f"run {prov.get('run', '?')})",
        "",
        f"Backbone {info['backbone']['architecture']} ({info['backbone']['feature_dim']}-d "
        f"features) on {prep['image_size'][0]}x{prep['image_size'][1]} {prep['color_mode']} "
        f"images; LEO meta-trained {acc.get('num_classes', '?')}-way "
        f"{acc.get('num_shots', '?')}-shot.",
    ]
    if "accuracy" in acc:
        lines.append(
            f"Meta-test accuracy {100 * acc['accuracy']:.2f}% +- {100 * acc.get('ci95', 0):.2f}% "
            f"({acc.get('episodes', '?')} episodes)."
        )
    lines += [
        f"Commit {prov.get('commit') or 'unknown'}, params sha256 "
        f"{prov.get('params_sha256', 'unknown')}.",
        "",
        "Use (any number of classes >= 2, any number of images per class):",
        "",
        "    leo classify --bundle THIS_DIR --support SUPPORT_DIR --query QUERY_DIR",
        "",
        "    from leo.classify import FewShotClassifier",
        "    clf = FewShotClassifier.load('THIS_DIR').fit(support_images, labels)",
        "    probabilities = clf.predict_proba(query_images)",
        "",
        "`bundle.json` holds the preprocessing, the configs and the full provenance.",
        "",
    ]
    return "\n".join(lines)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling failure is bad input
        raise LeoInputError(f"{path}: not a readable weight file ({type(err).__name__})") from None
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise LeoInputError(f"{path}: expected a dict of named tensors")
    return obj


def read_info(path: str | os.PathLike) -> dict[str, Any]:
    """``bundle.json`` of a bundle directory, after the format and version checks.

    Raises:
        LeoInputError: no bundle here, not JSON, another format or another version.
    """
    path = Path(path)
    meta = path / BUNDLE_JSON
    if not meta.is_file():
        raise LeoInputError(f"{path}: not a classifier bundle (no {BUNDLE_JSON})")
    try:
        info = json.loads(meta.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise LeoInputError(f"{meta}: not valid JSON ({err})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LeoInputError(f"{meta}: not a LEO classifier bundle (format is not {FORMAT!r})")
    if info.get("version") != VERSION:
        import leo

        raise LeoInputError(
            f"{meta}: bundle format version {info.get('version')!r} (written by leo "
            f"{info.get('leo_version', '?')}); this leo ({leo.__version__}) reads version "
            f"{VERSION}: export it again with this version"
        )
    return info


def read_bundle(path: str | os.PathLike) -> Bundle:
    """Load a bundle written by :func:`write_bundle` (on the CPU).

    Raises:
        LeoInputError: see the module docstring; the line names the file.
    """
    path = Path(path)
    info = read_info(path)
    meta = path / BUNDLE_JSON
    try:
        prep_info, bb_info, leo_info = info["preprocessing"], info["backbone"], info["leo"]
        prep = Preprocessing(
            image_size=(int(prep_info["image_size"][0]), int(prep_info["image_size"][1])),
            channels=int(prep_info["channels"]),
            mean=tuple(float(v) for v in prep_info["mean"]),
            std=tuple(float(v) for v in prep_info["std"]),
        )
        wrn_config = WRNConfig(**bb_info["config"])
        config = config_from_dict(leo_info["config"])
    except LeoInputError as err:
        raise LeoInputError(f"{meta}: leo.config: {err}") from None
    except (KeyError, IndexError, TypeError, ValueError) as err:
        raise LeoInputError(f"{meta}: malformed ({type(err).__name__}: {err})") from None
    files = {}
    for entry, name in ((bb_info, BACKBONE_FILE), (leo_info, LEO_FILE)):
        file = path / name
        if not file.is_file():
            raise LeoInputError(f"{file}: missing from the bundle")
        if file_sha256(file) != entry.get("sha256"):
            raise LeoInputError(f"{file}: sha256 differs from {BUNDLE_JSON}'s (a damaged bundle)")
        files[name] = _tensors(file)
    backbone = WideResNet(wrn_config)
    try:
        backbone.load_state_dict(files[BACKBONE_FILE])
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise LeoInputError(
            f"{path / BACKBONE_FILE}: does not fit {meta}'s backbone ({first})"
        ) from None
    backbone.eval()
    if wrn_config.in_channels != prep.channels or not (
        torch.allclose(backbone.mean, torch.tensor(prep.mean))
        and torch.allclose(backbone.std, torch.tensor(prep.std))
    ):
        raise LeoInputError(f"{meta}: preprocessing differs from the backbone's normalisation")
    params = {k: v.float() for k, v in files[LEO_FILE].items()}
    problems = check_params(params, config, wrn_config.feature_dim)
    if problems:
        raise LeoInputError(f"{path / LEO_FILE}: {problems[0]}")
    return Bundle(
        path=path,
        backbone=backbone,
        params=params,
        config=config,
        preprocessing=prep,
        provenance=dict(info.get("provenance") or {}),
        info=info,
    )
