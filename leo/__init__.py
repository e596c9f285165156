"""LEO: Latent Embedding Optimization (Rusu et al., ICLR 2019) in PyTorch.

The public API, importable from here (each name is loaded on first use, so ``import leo``
stays cheap); ``docs/api.md`` walks through it and ``docs/architecture.md`` maps the
subpackages:

========================  ==================================================================
config and presets        :class:`LEOConfig`, :data:`PRESETS`, :func:`make_config`,
                          :func:`load_run_config` (a run of ``params.yaml``)
parameters                :func:`init_params`, :data:`STEP_SIZE_NAMES`, :func:`weight_names`
the episode meta-loss     :func:`episode_loss`, :func:`meta_loss`, :func:`adapt`
one outer step            :class:`MetaStep`, :func:`draw_noise`
training                  :func:`meta_train`, :func:`load_checkpoint`, :class:`TrainResult`
evaluation                :func:`evaluate`, :class:`EvalResult`
the embedding store       :func:`write_embeddings`, :func:`read_embeddings`,
                          :class:`EmbeddingSplit`, :func:`read_metadata`
the published import      :func:`import_published`
comparison                :func:`compare`, :class:`CompareSettings`
========================  ==================================================================

Subpackages, lowest first (imports flow one way, down this list):

- ``leo.utils``: errors, atomic writes, hashing, device and thread choice, compiling;
- ``leo.core``: the config and the LEO math (pure functions, explicit gradients, noise,
  the optimiser, the batched step);
- ``leo.data``: the Parquet store, safe unpickling, the published import, raw datasets;
- ``leo.backbone``: the Wide ResNet, its pre-training and the frozen embedding;
- ``leo.meta``: episodes, the outer training loop (LEO and MAML), evaluation;
- ``leo.comparison``: methods, baselines, MAML, statistics, ensembles, figures;
- ``leo.settings``: ``params.yaml`` validated section by section;
- ``leo.report``: the pipeline's metrics and training curves.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = {
    "LEOConfig": "leo.core.config",
    "PRESETS": "leo.core.config",
    "make_config": "leo.core.config",
    "load_run_config": "leo.settings",
    "init_params": "leo.core.model",
    "STEP_SIZE_NAMES": "leo.core.model",
    "weight_names": "leo.core.model",
    "adapt": "leo.core.model",
    "episode_loss": "leo.core.model",
    "meta_loss": "leo.core.model",
    "MetaStep": "leo.core.step",
    "draw_noise": "leo.core.noise",
    "meta_train": "leo.meta.train",
    "load_checkpoint": "leo.meta.train",
    "TrainResult": "leo.meta.train",
    "evaluate": "leo.meta.evaluate",
    "EvalResult": "leo.meta.evaluate",
    "write_embeddings": "leo.data.store",
    "read_embeddings": "leo.data.store",
    "read_metadata": "leo.data.store",
    "EmbeddingSplit": "leo.data.store",
    "import_published": "leo.data.published",
    "compare": "leo.comparison.compare",
    "CompareSettings": "leo.comparison.options",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    """Load a public name from its module on first use."""
    if name not in _API:
        raise AttributeError(f"module 'leo' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
