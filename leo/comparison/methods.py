"""The methods of the comparison, by name: how to train each (if at all) and its classifier.

=========================  =======  ======================================================
name                       trainer  what it is
=========================  =======  ======================================================
``leo``                    leo      LEO as configured (the base config)
``leo-deterministic``      leo      no sampling anywhere, train and test (Table 2)
``leo-random-prior``       leo      latent init z ~ N(0, I), no encoder (Table 2)
``leo-no-finetune``        leo      no parameter-space fine-tuning (0 steps, train and test)
``leo-finetune-only``      leo      no latent inner loop (0 steps): decode, then fine-tune
``leo-pbt``                leo      LEO with tune@<run>'s PBT-tuned hyperparameters (the
                                    comparison passes them in the base config)
``maml``                   maml     MAML on the same embeddings (Table 2), fixed inner lr
``nearest-mean-cosine``    -        cosine to the class-mean prototypes
``nearest-mean-euclidean`` -        squared Euclidean distance to the class means
``logistic-regression``    -        L2 softmax regression fitted on each support set
=========================  =======  ======================================================

Every method is derived from ONE base :class:`~leo.core.config.LEOConfig` (preset + overrides), so
the problem (N, K), the protocol (queries, validation, steps, seed) and the outer clipping
are shared: the LEO variants differ from ``leo`` only in the fields listed here, and MAML
copies :data:`MAML_SHARED_FIELDS` from it. A method is used in two calls:

    ckpt = train_method(name, base, train, val, out_dir)  # None: nothing to train
    classify = method_classifier(name, ckpt)              # a leo.meta.evaluate.Classifier
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from leo.comparison.baselines import (
    LogisticRegressionConfig,
    logistic_regression,
    nearest_mean_cosine,
    nearest_mean_euclidean,
)
from leo.comparison.maml import (
    MAMLConfig,
    load_maml_checkpoint,
    make_maml_config,
    maml_classifier,
    maml_train,
)
from leo.comparison.registry import (  # noqa: F401 - the registry, re-exported
    LEO,
    MAML,
    MAML_SHARED_FIELDS,
    METHODS,
    NONE,
    TUNED,
    Method,
    get_method,
)
from leo.core.config import LEOConfig
from leo.meta.evaluate import Classifier, leo_classifier
from leo.meta.train import load_checkpoint, meta_train
from leo.utils.errors import LeoInputError

_FIXED: dict[str, Classifier] = {
    "nearest-mean-cosine": nearest_mean_cosine,
    "nearest-mean-euclidean": nearest_mean_euclidean,
    "logistic-regression": logistic_regression(LogisticRegressionConfig()),
}


def method_config(
    name: str, base: LEOConfig, **maml_overrides: Any
) -> LEOConfig | MAMLConfig | None:
    """The config ``name`` trains with: the base LEO config with the variant's overrides, a
    MAML config sharing :data:`MAML_SHARED_FIELDS` with it (plus ``maml_overrides``), or None
    for methods without training."""
    method = get_method(name)
    if method.trainer == LEO:
        return dataclasses.replace(base, **method.overrides)
    if method.trainer == MAML:
        shared = {k: getattr(base, k) for k in MAML_SHARED_FIELDS}
        return make_maml_config(**{**shared, **maml_overrides})
    return None


def train_method(
    name: str,
    base: LEOConfig,
    train,
    val,
    out_dir: str | Path,
    *,
    device=None,
    progress: bool = False,
    live=None,
    **maml_overrides: Any,
) -> Path | None:
    """Meta-train ``name`` if it needs it; return its best checkpoint (None: no training).

    LEO variants go through :func:`leo.meta.train.meta_train` (which resumes an interrupted run and
    returns at once for a finished one); MAML through :func:`leo.comparison.maml.maml_train`.
    ``live``: a fresh DVCLive log for the training history (:func:`leo.utils.live.open_live`).
    Training runs on torch's current CPU thread setting.
    """
    cfg = method_config(name, base, **maml_overrides)
    if cfg is None:
        return None
    trainer = meta_train if isinstance(cfg, LEOConfig) else maml_train
    result = trainer(
        cfg, train, val, out_dir, device=device, progress=progress, live=live, cpu_threads=None
    )
    return result.checkpoint


def method_classifier(
    name: str, checkpoint: str | Path | None = None, *, device=None
) -> Classifier:
    """The batched classifier of ``name``; trained methods read their ``best.pt``.

    Raises:
        LeoInputError: unknown name, or a trained method without a checkpoint.
    """
    method = get_method(name)
    if not method.needs_training:
        return _FIXED[name]
    if checkpoint is None:
        raise LeoInputError(f"method {name!r} needs a trained checkpoint")
    if method.trainer == LEO:
        params, cfg, _ = load_checkpoint(checkpoint)
        return leo_classifier({k: v.to(device) for k, v in params.items()}, cfg)
    params, cfg, _ = load_maml_checkpoint(checkpoint)
    return maml_classifier({k: v.to(device) for k, v in params.items()}, cfg)
