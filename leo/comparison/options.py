"""What :func:`leo.comparison.compare.compare` is asked to do, checked before it starts.

:class:`CompareSettings` holds what to train and measure (every count checked, the methods
looked up in :data:`leo.comparison.methods.METHODS`); :func:`check_base` holds the LEO config
the methods start from to the one the LEO checkpoint was meta-trained with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from leo.comparison.registry import METHODS, REFERENCE, get_method
from leo.core.config import LEOConfig
from leo.utils.errors import LeoInputError

SAMPLE_COUNTS = (1, 5, 20)  # the ensemble sizes S measured by default
# LEOConfig fields that define neither the model nor the problem, so the base config may
# differ from the checkpoint's in them: how a step executes (compile; form and gradients
# compute the same values), the seed, and how long the other methods train.
UNCHECKED_FIELDS = frozenset(
    {"compile", "form", "gradients", "seed", "num_steps", "validate_every"}
)


@dataclass(frozen=True)
class CompareSettings:
    """What a comparison trains and measures.

    Attributes:
        methods: names of :data:`leo.comparison.methods.METHODS` (default: all of them, in the
            registry's order); must include ``"leo"``.
        train_steps: outer steps of each trained method (None: the base config's).
        validate_every: steps between meta-validations (None: the base config's).
        maml: MAMLConfig overrides (beyond the fields shared with the base config).
        num_episodes, batch_size, seed: the test episodes (as ``evaluate``).
        ensemble_episodes: episodes of the ensemble table (0, the default: no table).
        ensemble_samples: the ensemble sizes S.
        noise_seed: seeds the ensembles' samples.
        figure_episodes: validation episodes of Figure 2 (0, the default: no figure; the
            paper: 1000).
        figure_iterations: t-SNE gradient steps of Figure 2.
        tuned: LEOConfig fields of ``leo-pbt`` (tune@<run>'s best hyperparameters), applied
            to the base config; ``leo-pbt`` trains as long as the base (the same budget as
            ``leo``). None or empty: nothing tuned, ``leo-pbt`` is the base config.

    Raises:
        LeoInputError: an unknown or repeated method, no ``"leo"``, or a count out of range.
    """

    methods: tuple[str, ...] = tuple(METHODS)
    train_steps: int | None = None
    validate_every: int | None = None
    maml: dict[str, Any] = field(default_factory=dict)
    num_episodes: int = 10_000
    batch_size: int = 200
    seed: int = 1
    ensemble_episodes: int = 0
    ensemble_samples: tuple[int, ...] = SAMPLE_COUNTS
    noise_seed: int = 0
    figure_episodes: int = 0
    figure_iterations: int = 1000
    tuned: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", tuple(self.methods))
        object.__setattr__(self, "ensemble_samples", tuple(self.ensemble_samples))
        for key in ("num_episodes", "batch_size", "figure_iterations"):
            _require_int(self, key, 1)
        for key in ("train_steps", "validate_every"):
            _require_int(self, key, 1, nullable=True)
        for key in ("seed", "ensemble_episodes", "noise_seed", "figure_episodes"):
            _require_int(self, key, 0)
        samples = self.ensemble_samples
        if not samples or not all(_is_int(size, 1) for size in samples):
            raise LeoInputError(
                f"CompareSettings.ensemble_samples: must be ints >= 1, got {samples!r}"
            )
        try:
            for name in self.methods:
                get_method(name)
        except LeoInputError as err:
            raise LeoInputError(f"CompareSettings.methods: {err}") from None
        if REFERENCE not in self.methods:
            raise LeoInputError(f"CompareSettings.methods: must include {REFERENCE!r}")
        if len(set(self.methods)) != len(self.methods):
            raise LeoInputError("CompareSettings.methods: a method is listed twice")
        names = {f.name for f in dataclasses.fields(LEOConfig)}
        for key in self.tuned or {}:
            if key not in names:
                raise LeoInputError(f"CompareSettings.tuned: {key!r} is not a LEOConfig field")


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _require_int(settings: CompareSettings, key: str, least: int, nullable: bool = False) -> None:
    value = getattr(settings, key)
    if not (_is_int(value, least) or (nullable and value is None)):
        none = " or None" if nullable else ""
        raise LeoInputError(
            f"CompareSettings.{key}: must be an int >= {least}{none}, got {value!r}"
        )


def check_base(base: LEOConfig | None, stored: LEOConfig, checkpoint: str | Path) -> LEOConfig:
    """The config the comparison runs with: ``base``, once it matches ``stored`` (the LEO
    checkpoint's) in every field but :data:`UNCHECKED_FIELDS`; None: ``stored`` itself.

    Raises:
        LeoInputError: the first field that differs, with both values.
    """
    if base is None:
        return stored
    if not isinstance(base, LEOConfig):
        raise LeoInputError(f"base must be a LEOConfig or None, got {type(base).__name__}")
    for f in dataclasses.fields(LEOConfig):
        ours, theirs = getattr(base, f.name), getattr(stored, f.name)
        if f.name not in UNCHECKED_FIELDS and ours != theirs:
            raise LeoInputError(
                f"{checkpoint}: the LEO config given has {f.name}={ours!r} but the checkpoint "
                f"was meta-trained with {f.name}={theirs!r}"
            )
    return base
