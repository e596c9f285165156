"""The pre-training configuration: a validated dataclass, apart from the torch code so that
``params.yaml`` can be checked without importing torch (:mod:`leo.settings`)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from leo.utils.validation import STRICT, Count, PosInt, Positive, Rate, Weight


@dataclass(config=STRICT)
class PretrainConfig:
    """Architecture and optimisation of the pre-training.

    Attributes:
        depth: WRN depth d (6n + 4).
        width: WRN widening factor k; features are 64k-d.
        strides: strides of the three groups (paper: three down-sampling steps).
        dropout: dropout rate inside the blocks.
        epochs: passes over the (non-held-out) meta-train images.
        batch_size: images per SGD step.
        lr: peak learning rate.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 weight decay (SGD's coupled form).
        schedule: ``cosine`` (to 0 over all iterations) or ``step`` (times ``gamma`` at
            every epoch in ``milestones``).
        milestones: epochs at which the step schedule decays.
        gamma: step-schedule decay factor.
        augment: ``shift`` (Omniglot), ``crop_flip`` (natural images) or ``none``.
        pad: padding (pixels) for the random shift/crop.
        heldout_fraction: fraction of every class's images held out for model selection.
        eval_batch_size: batch size of held-out evaluation.
        amp: bfloat16 autocast on CUDA (ignored on CPU).
        seed: seed of the held-out split and of every epoch's randomness.
    """

    depth: Annotated[int, Field(ge=10)] = 10
    width: PosInt = 2
    strides: Annotated[list[PosInt], Field(min_length=3, max_length=3)] = (2, 2, 2)
    dropout: Rate = 0.0
    epochs: PosInt = 10
    batch_size: PosInt = 128
    lr: Positive = 0.1
    momentum: Rate = 0.9
    nesterov: bool = True
    weight_decay: Weight = 5e-4
    schedule: Literal["cosine", "step"] = "cosine"
    milestones: list[PosInt] = ()
    gamma: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    augment: Literal["shift", "crop_flip", "none"] = "shift"
    pad: Count = 2
    heldout_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.1
    eval_batch_size: PosInt = 512
    amp: bool = False
    seed: Count = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "strides", tuple(self.strides))
        object.__setattr__(self, "milestones", list(self.milestones))
        if (self.depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 (got {self.depth})")
