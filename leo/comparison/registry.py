"""Which methods the comparison knows, and what each is: names, trainers, summaries, the LEO
fields each variant changes. Plain data (no torch), so that ``params.yaml``'s
``compare.methods`` is checked without loading the methods themselves
(:mod:`leo.comparison.methods` builds and trains them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from leo.utils.errors import LeoInputError

REFERENCE = "leo"  # the method every other is paired with
LEO, MAML, NONE = "leo", "maml", None
TUNED = "leo-pbt"  # trained from the base config with tune@<run>'s hyperparameters applied

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
        trainer: ``"leo"`` (:func:`leo.meta.train.meta_train`), ``"maml"``
            (:func:`leo.comparison.maml.maml_train`) or None (nothing to train).
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
        Method(TUNED, LEO, "LEO, PBT-tuned (tune@<run>'s hyperparameters)"),
        Method("maml", MAML, "MAML on the same embeddings (fixed inner step size)"),
        Method("nearest-mean-cosine", NONE, "nearest class mean, cosine similarity"),
        Method("nearest-mean-euclidean", NONE, "nearest class mean, Euclidean distance"),
        Method("logistic-regression", NONE, "L2 logistic regression on the support set"),
    )
}


def get_method(name: str) -> Method:
    """The registry entry of ``name``.

    Raises:
        LeoInputError: unknown name, listing the known ones.
    """
    if name not in METHODS:
        raise LeoInputError(f"unknown method {name!r} (one of {', '.join(METHODS)})")
    return METHODS[name]
