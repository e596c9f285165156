"""MAML's configuration: a validated dataclass, apart from MAML's torch code so that
``params.yaml`` can be checked without importing torch (:mod:`leo.settings`).

Step size: left unset, ``inner_lr`` is 1.0 at 1-shot and 0.1 at more shots: with K support
examples a class's summed support gradient is K times larger, and on Omniglot
meta-validation 1.0 diverges at 5-shot (0.51 after 1,000 steps) where 0.1 reaches 0.97
(docs/findings.md).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from leo.utils.validation import STRICT, Count, PosInt, Positive, Weight, build

DEFAULT_INNER_LR = {True: 1.0, False: 0.1}  # by num_shots == 1


@dataclass(config=STRICT)
class MAMLConfig:
    """MAML's knobs; the problem, protocol and execution fields mean what they do in LEO."""

    # --- problem (as LEOConfig) ---
    num_classes: Annotated[int, Field(ge=2)] = 5  # N
    num_shots: PosInt = 1  # K
    num_queries: PosInt = 15  # queries per class in meta-training episodes
    # support + queries per class at evaluation
    eval_per_class_total: Annotated[int, Field(ge=2)] | None = 600

    # --- model ---
    inner_steps: Count = 5  # S: gradient steps on the support loss (Finn et al.: 5 in training)
    eval_inner_steps: Count | None = None  # None: same as inner_steps (Finn et al.: 10 at test)
    inner_lr: Weight | None = None  # alpha (fixed), or its init when learn_inner_lr; None:
    #   1.0 at 1-shot, 0.1 at K > 1 (each chosen on Omniglot meta-validation, docs/findings.md)
    learn_inner_lr: bool = False  # False: fixed alpha, MAML's original form
    use_bias: bool = True  # meta-learn and adapt a bias b (N,) beside W (N, D)
    first_order: bool = False  # opt-in: stop gradients through the inner-loop gradients

    # --- outer optimisation (same clipping and Adam as LEO) ---
    outer_lr: Positive = 1e-3  # Adam learning rate (Finn et al.'s meta step size)
    gradient_threshold: Weight = 0.1  # clip every gradient element to +-this
    gradient_norm_threshold: Weight = 0.1  # then clip each tensor's norm to this
    batch_size: PosInt = 12  # episodes per meta-batch
    num_steps: PosInt = 100_000  # outer steps (early stopping keeps the best validation)
    validate_every: PosInt = 1_000  # steps between meta-validations
    val_batches: PosInt = 10  # meta-validation: batches of ...
    val_batch_size: PosInt = 200  # ... episodes each

    # --- execution ---
    seed: Count = 0
    compile: bool | Literal["auto"] = "auto"  # torch.compile the batched loss (auto: CUDA only)

    def __post_init__(self) -> None:
        if self.inner_lr is None:  # the step size that suits the shots (module docstring)
            object.__setattr__(self, "inner_lr", DEFAULT_INNER_LR[self.num_shots == 1])

    @property
    def test_inner_steps(self) -> int:
        """Adaptation steps at evaluation."""
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and JSON)."""
        return dataclasses.asdict(self)


def make_maml_config(**overrides: Any) -> MAMLConfig:
    """MAMLConfig from field overrides.

    Raises:
        LeoInputError: an unknown field or a bad value, naming it.
    """
    return build(MAMLConfig, overrides, "MAML config")
