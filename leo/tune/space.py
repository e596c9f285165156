"""The search space of population-based training: which LEO hyperparameters, over what.

A dimension is a range (``{low, high}``, sampled uniformly, or log-uniformly with ``log:
true``) or a list of ``choices``. Only the fields of :data:`TUNABLE` may be searched; each
is a field of :class:`~leo.core.config.LEOConfig` whose change in the middle of a run has an
exact meaning (``docs/tune.md``):

- the outer learning rate, dropout, the objective's weights (KL, encoder penalty, L2,
  orthogonality) and the step counts act from the next outer step on;
- the step-size inits (``inner_lr_init``, ``finetune_lr_init``) only set the learned
  per-latent / per-dimension step sizes at step 0. A trial that changes one from ``a`` to
  ``b`` after step 0 multiplies the learned step sizes by ``b / a`` (:data:`STEP_SIZE_INITS`),
  so the init stays what it says: the scale a fresh run would start the vector at.

The population starts with the run's own values (clamped into the space: the trial a plain
``metatrain`` would be) and ``population - 1`` draws from a generator seeded by the run's
seed, so a search is reproducible. Explore perturbs a float by a factor (Ray Tune's 0.8 /
1.2) and then :func:`clamp` puts it back inside its range, since Ray Tune does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from leo.core.config import LEOConfig
from leo.utils.errors import LeoInputError
from leo.utils.validation import build

FLOAT, INT = "float", "int"

# Searchable LEOConfig fields and their kind (floats take ranges, ints take choices).
TUNABLE: dict[str, str] = {
    "outer_lr": FLOAT,
    "dropout": FLOAT,
    "kl_weight": FLOAT,
    "encoder_penalty_weight": FLOAT,
    "l2_penalty_weight": FLOAT,
    "orthogonality_penalty_weight": FLOAT,
    "inner_lr_init": FLOAT,
    "finetune_lr_init": FLOAT,
    "inner_steps": INT,
    "finetune_steps": INT,
    "eval_inner_steps": INT,
    "eval_finetune_steps": INT,
}

# Inits whose change after step 0 rescales a learned parameter: init -> parameter name.
STEP_SIZE_INITS: dict[str, str] = {"inner_lr_init": "inner_lr", "finetune_lr_init": "finetune_lr"}


@dataclass(frozen=True)
class Dimension:
    """One searched hyperparameter: a range (``low``, ``high``, ``log``) or ``choices``."""

    name: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None

    def sample(self, rng: np.random.Generator) -> Any:
        """A value drawn uniformly (log-uniformly with ``log``) from the range, or a choice."""
        if self.choices is not None:
            return self.choices[int(rng.integers(len(self.choices)))]
        if self.log:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(self.high))))
        return float(rng.uniform(self.low, self.high))

    def clamp(self, value: Any) -> Any:
        """``value`` inside the range, or the nearest choice (the first of equals)."""
        if self.choices is not None:
            return min(self.choices, key=lambda c: abs(c - value))
        return float(min(max(value, self.low), self.high))

    def ray_domain(self):
        """Ray Tune's form: ``tune.uniform``/``tune.loguniform``, or the list of choices."""
        from ray import tune

        if self.choices is not None:
            return list(self.choices)
        return (tune.loguniform if self.log else tune.uniform)(self.low, self.high)

    def ray_sampler(self):
        """The dimension as a Ray Tune search-space entry (``param_space``)."""
        from ray import tune

        domain = self.ray_domain()
        return tune.choice(domain) if isinstance(domain, list) else domain

    def describe(self) -> str:
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        return f"[{self.low:g}, {self.high:g}]{' log' if self.log else ''}"


def _check_value(base: LEOConfig, name: str, value: Any, where: str, key: str) -> None:
    """Raise LeoInputError ``<where>: <key>: ...`` unless LEOConfig accepts ``name=value``."""
    try:
        build(LEOConfig, {**base.to_dict(), name: value}, where)
    except LeoInputError as err:
        raise LeoInputError(
            str(err).replace(f"{where}: {name}: ", f"{where}: {key}: ", 1)
        ) from None


def _check_init(name: str, value: Any, where: str, key: str) -> None:
    """A step-size init changes by a ratio (:data:`STEP_SIZE_INITS`): it must be > 0."""
    if name in STEP_SIZE_INITS and not value > 0:
        raise LeoInputError(f"{where}: {key}: a step-size init must be > 0 (got {value})")


def make_space(
    entries: dict[str, Any], base: LEOConfig, where: str, key: str
) -> dict[str, Dimension]:
    """Validated dimensions from ``{name: {low, high, log} | {choices}}`` (mappings or models).

    Every bound and choice must make a valid LEOConfig together with ``base`` (so a dropout
    range must stay below 1, a step count be a non-negative integer).

    Raises:
        LeoInputError: ``<where>: <key>.<name>: ...`` for an unknown name, an empty or
            inverted range, a log range through 0, a float range for an integer field,
            empty or repeated choices, or a value LEOConfig refuses.
    """
    space: dict[str, Dimension] = {}
    for name, entry in entries.items():
        at = f"{key}.{name}"
        if name not in TUNABLE:
            raise LeoInputError(
                f"{where}: {at}: unknown hyperparameter (one of {', '.join(TUNABLE)})"
            )
        values = entry if isinstance(entry, dict) else entry.model_dump()
        choices = values.get("choices")
        if choices is not None:
            if not choices:
                raise LeoInputError(f"{where}: {at}.choices: empty")
            for i, value in enumerate(choices):
                if value in choices[:i]:
                    raise LeoInputError(f"{where}: {at}.choices[{i}]: {value!r} is listed twice")
                _check_value(base, name, value, where, f"{at}.choices[{i}]")
                _check_init(name, value, where, f"{at}.choices[{i}]")
            space[name] = Dimension(name, choices=tuple(choices))
            continue
        low, high, log = values.get("low"), values.get("high"), bool(values.get("log"))
        if TUNABLE[name] == INT:
            raise LeoInputError(f"{where}: {at}: an integer hyperparameter takes choices: [...]")
        if low is None or high is None:
            raise LeoInputError(f"{where}: {at}: needs low and high (or choices)")
        if not low < high:
            raise LeoInputError(
                f"{where}: {at}: empty or inverted range (low {low} >= high {high})"
            )
        if log and low <= 0:
            raise LeoInputError(f"{where}: {at}.low: must be > 0 for a log range (got {low})")
        for bound, value in (("low", low), ("high", high)):
            _check_value(base, name, float(value), where, f"{at}.{bound}")
            _check_init(name, value, where, f"{at}.{bound}")
        space[name] = Dimension(name, float(low), float(high), log)
    return space


def initial_population(
    space: dict[str, Dimension], base: LEOConfig, size: int, seed: int
) -> list[dict[str, Any]]:
    """``size`` starting hyperparameter sets: the base config's own values (clamped into the
    space) first, then draws from a numpy generator seeded ``seed``."""
    rng = np.random.default_rng(seed)
    own = {}
    for name, dim in space.items():
        value = getattr(base, name)
        if value is None:  # eval_*_steps: None means "as in training"
            value = getattr(base, name.removeprefix("eval_"))
        own[name] = dim.clamp(value)
    draws = [{name: dim.sample(rng) for name, dim in space.items()} for _ in range(size - 1)]
    return [own, *draws]


def clamp(space: dict[str, Dimension], values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with every searched hyperparameter put back inside its dimension."""
    return {k: (space[k].clamp(v) if k in space else v) for k, v in values.items()}


def apply(base: LEOConfig, values: dict[str, Any], where: str = "tune") -> LEOConfig:
    """``base`` with the searched ``values`` (validated as LEOConfig)."""
    return build(LEOConfig, {**base.to_dict(), **values}, where)
