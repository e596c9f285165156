"""The methods of the comparison, by name: how to train each (if at all) and its classifier.

=========================  =======  ======================================================
name                       trainer  what it is
=========================  =======  ======================================================
``leo``                    leo      LEO as configured (the base config)
``leo-deterministic``      leo      no sampling anywhere, train and test (Table 2)
``leo-random-prior``       leo      latent init z ~ N(0, I), no encoder (Table 2)
``leo-no-finetune``        leo      no parameter-space fine-tuning (0 steps, train and test)
``leo-finetune-only``      leo      no latent inner loop (0 steps): decode, then fine-tune
``maml``                   maml     MAML on the same embeddings (Table 2), fixed inner lr
``nearest-mean-cosine``    -        cosine to the class-mean prototypes
``nearest-mean-euclidean`` -        squared Euclidean distance to the class means
``logistic-regression``    -        L2 softmax regression fitted on each support set
=========================  =======  ======================================================

Every method is derived from ONE base :class:`~leo.config.LEOConfig` (preset + overrides), so
the problem (N, K), the protocol (queries, validation, steps, seed) and the outer clipping
are shared: the LEO variants differ from ``leo`` only in the fields listed here, and MAML
copies :data:`MAML_SHARED_FIELDS` from it. A method is used in two calls:

    ckpt = train_method(name, base, train, val, out_dir)  # None: nothing to train
    classify = method_classifier(name, ckpt)              # a leo.evaluate.Classifier
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leo.baselines import (
    LogisticRegressionConfig,
    logistic_regression,
    nearest_mean_cosine,
    nearest_mean_euclidean,
)
from leo.config import LEOConfig
from leo.errors import LeoInputError
from leo.evaluate import Classifier, leo_classifier
from leo.maml import MAMLConfig, load_maml_checkpoint, make_maml_config, maml_classifier, maml_train
from leo.train import load_checkpoint, meta_train

LEO, MAML, NONE = "leo", "maml", None

# Fields MAML takes from the base LEO config: problem, protocol, outer clipping, execution.
MAML_SHARED_FIELDS = (
    "num_classes",
    "num_shots",
    "num_queries",
    "eval_per_class_total",
    "gradient_threshold",
    "gradient_norm_threshold",
    "batch_size",
    "num_steps",
    "validate_every",
    "val_batches",
    "val_batch_size",
    "seed",
    "compile",
)


@dataclass(frozen=True)
class Method:
    """One entry of the registry.

    Attributes:
        name: the method's name in reports.
        trainer: ``"leo"`` (:func:`leo.train.meta_train`), ``"maml"``
            (:func:`leo.maml.maml_train`) or None (nothing to train).
        summary: one line for reports.
        overrides: LEO config fields this variant changes from the base config.
    """

    name: str
    trainer: str | None
    summary: str
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def needs_training(self) -> bool:
        return self.trainer is not None


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("leo", LEO, "LEO"),
        Method(
            "leo-deterministic",
            LEO,
            "LEO without sampling (train and test)",
            {"deterministic": True},
        ),
        Method("leo-random-prior", LEO, "LEO, latent init from N(0, I)", {"random_prior": True}),
        Method(
            "leo-no-finetune",
            LEO,
            "LEO without parameter-space fine-tuning",
            {"finetune_steps": 0, "eval_finetune_steps": 0},
        ),
        Method(
            "leo-finetune-only",
            LEO,
            "LEO without the latent inner loop (decode, then fine-tune)",
            {"inner_steps": 0, "eval_inner_steps": 0},
        ),
        Method("maml", MAML, "MAML on the same embeddings (fixed inner step size)"),
        Method("nearest-mean-cosine", NONE, "nearest class mean, cosine similarity"),
        Method("nearest-mean-euclidean", NONE, "nearest class mean, Euclidean distance"),
        Method("logistic-regression", NONE, "L2 logistic regression on the support set"),
    )
}

_FIXED: dict[str, Classifier] = {
    "nearest-mean-cosine": nearest_mean_cosine,
    "nearest-mean-euclidean": nearest_mean_euclidean,
    "logistic-regression": logistic_regression(LogisticRegressionConfig()),
}


def get_method(name: str) -> Method:
    """The registry entry of ``name``.

    Raises:
        LeoInputError: unknown name, listing the known ones.
    """
    if name not in METHODS:
        raise LeoInputError(f"unknown method {name!r} (one of {', '.join(METHODS)})")
    return METHODS[name]


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
    **maml_overrides: Any,
) -> Path | None:
    """Meta-train ``name`` if it needs it; return its best checkpoint (None: no training).

    LEO variants go through :func:`leo.train.meta_train` (which resumes an interrupted run and
    returns at once for a finished one); MAML through :func:`leo.maml.maml_train`.
    """
    cfg = method_config(name, base, **maml_overrides)
    if cfg is None:
        return None
    trainer = meta_train if isinstance(cfg, LEOConfig) else maml_train
    return trainer(cfg, train, val, out_dir, device=device, progress=progress).checkpoint


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
