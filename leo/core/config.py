"""LEO configuration: one frozen, validated dataclass, the reference defaults, the presets.

Field comments name the paper's symbols (beta, gamma, lambda1, lambda2, alpha) and the
reference code's flag where they differ. Defaults are the reference code's (``docs/model.md``,
"Hyperparameters"); the pipeline's CPU-sized Omniglot schedule lives in ``params.yaml``
(:func:`leo.load_run_config` reads it). Validation is pydantic's: strict types, ranges as
``Field`` constraints, unknown keys refused, every error one line naming the field.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from leo.utils.errors import LeoInputError
from leo.utils.validation import STRICT, Count, PosInt, Positive, Rate, Weight, build


@dataclass(config=STRICT)
class LEOConfig:
    """Every knob of the model, its meta-training and its evaluation."""

    # --- problem ---
    num_classes: Annotated[int, Field(ge=2)] = 5  # N: classes per episode
    num_shots: PosInt = 1  # K: support examples per class
    num_queries: PosInt = 15  # queries per class in meta-training episodes
    # Support + queries per class at evaluation (the protocol's total: 600 on miniImageNet;
    # None = every example of the class).
    eval_per_class_total: Annotated[int, Field(ge=2)] | None = 600

    # --- model ---
    latent_dim: PosInt = 64  # Z, "num_latents"
    hidden_dim: PosInt | None = None  # None: linear encoder/decoder (reference code);
    #   an int (the paper's 256): 2-layer ReLU encoder and decoder with this hidden width
    dropout: Rate = 0.5  # dropout rate on embeddings, meta-training only ("dropout_rate")
    inner_steps: Count = 5  # LEO latent-space adaptation steps ("inner_unroll_length")
    finetune_steps: Count = 5  # parameter-space fine-tuning steps ("finetuning_unroll_length")
    eval_inner_steps: Count | None = None  # None: as inner_steps (the paper: 3 train / 6 test)
    eval_finetune_steps: Count | None = None  # None: same as finetune_steps
    inner_lr_init: float = 1.0  # alpha, init of the learnable per-latent step size
    finetune_lr_init: float = 1e-3  # init of the learnable per-dimension fine-tuning step size

    # --- objective ---
    kl_weight: Weight = 1e-3  # beta
    encoder_penalty_weight: Weight = 1e-9  # gamma
    l2_penalty_weight: Positive = 1e-8  # lambda1 (L2 = sum(w^2)/2 over network weights;
    #   > 0: the NaN fallback divides by it)
    orthogonality_penalty_weight: Weight = 1e-3  # lambda2 (on the decoder matrix)

    # --- ablations and options ---
    deterministic: bool = False  # no sampling anywhere, train and test (paper Table 2)
    random_prior: bool = False  # latent init z ~ N(0, I) instead of the encoder (Table 2)
    first_order: bool = False  # opt-in: stop gradients through the inner-loop gradients
    # "fast": closed-form inner gradients and factored relation net; "literal": every pair,
    # every weight sample's logits, torch.func.grad (the same values).
    form: Literal["fast", "literal"] = "fast"
    # Meta-training's meta-gradient: "explicit", the batch's reverse pass derived by hand
    # (leo/core/explicit.py; linear encoder/decoder, fast form; other configs use autograd);
    # "autograd": torch.func.vmap + autograd (the same values).
    gradients: Literal["explicit", "autograd"] = "explicit"

    # --- outer optimisation ---
    outer_lr: Positive = 1e-4  # Adam learning rate
    gradient_threshold: Weight = 0.1  # clip every gradient element to +-this
    gradient_norm_threshold: Weight = 0.1  # then clip each tensor's norm to this
    batch_size: PosInt = 12  # episodes per meta-batch
    num_steps: PosInt = 100_000  # outer steps (early stopping keeps the best validation)
    validate_every: PosInt = 1_000  # steps between meta-validations
    val_batches: PosInt = 10  # meta-validation: batches of ...
    val_batch_size: PosInt = 200  # ... episodes each

    # --- execution ---
    seed: Count = 0
    compile: bool | Literal["auto"] = "auto"  # torch.compile the batched step: True, False
    #   (eager), or "auto": on CUDA only (on a CPU it is no faster at 128-d and takes ~1 min)

    @property
    def test_inner_steps(self) -> int:
        """Latent adaptation steps at evaluation."""
        return self.inner_steps if self.eval_inner_steps is None else self.eval_inner_steps

    @property
    def test_finetune_steps(self) -> int:
        """Fine-tuning steps at evaluation."""
        return self.finetune_steps if self.eval_finetune_steps is None else self.eval_finetune_steps

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for checkpoints and JSON)."""
        return dataclasses.asdict(self)


def _tuned(outer_lr, l2, orth, dropout, kl, enc, shots) -> dict[str, Any]:
    return dict(
        outer_lr=outer_lr,
        l2_penalty_weight=l2,
        orthogonality_penalty_weight=orth,
        dropout=dropout,
        kl_weight=kl,
        encoder_penalty_weight=enc,
        num_shots=shots,
    )


# The hyperparameters published with the reference code (docs/model.md, "Published tuned
# presets").
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "mini-1shot": _tuned(2.739071e-4, 3.623413e-10, 0.188103, 0.307651, 0.756143, 5.756821e-6, 1),
    "mini-5shot": _tuned(4.102361e-4, 8.540338e-9, 1.523998e-3, 0.300299, 0.466387, 2.661608e-7, 5),
    "tiered-1shot": _tuned(
        8.659053e-4, 4.148858e-10, 5.451078e-3, 0.475126, 2.034189e-3, 8.302962e-5, 1
    ),
    "tiered-5shot": _tuned(
        6.110314e-4, 1.690399e-10, 2.481216e-2, 0.415158, 1.622811, 2.672450e-5, 5
    ),
}


def make_config(preset: str = "default", **overrides: Any) -> LEOConfig:
    """Build a config from a preset name plus field overrides.

    Raises:
        LeoInputError: unknown preset or field, naming it.
    """
    if preset not in PRESETS:
        raise LeoInputError(f"unknown LEO preset {preset!r} (one of {', '.join(PRESETS)})")
    return build(LEOConfig, {**PRESETS[preset], **overrides}, "LEO config")


def config_from_dict(values: dict[str, Any]) -> LEOConfig:
    """Inverse of :meth:`LEOConfig.to_dict` (unknown keys are an error)."""
    return make_config("default", **values)
