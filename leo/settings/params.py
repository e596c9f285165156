"""The whole ``params.yaml``, validated in one place before anything runs.

:func:`parse_settings` checks every section (:mod:`leo.settings.sections`) and then what the
sections cannot check alone: every run's LEO config (``metatrain.common`` merged into each
``metatrain.runs.<run>`` over its preset), every dataset's pre-training preset, the
comparison's methods and MAML overrides, and the references between sections. The stages
(:mod:`stages.common`) and the Prefect flow (:mod:`pipeline.flow`) both call it; a bad value
anywhere stops them with one line naming the key::

    params.yaml: metatrain.common.validate_every: must be greater than or equal to 1 (got 0)

The file is read as DVC reads it (YAML 1.2, ruamel.yaml), so ``1e-3`` is a number here too.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import PrivateAttr, ValidationError
from ruamel.yaml import YAML, YAMLError

from leo.core.config import PRESETS, LEOConfig
from leo.settings.sections import (
    Base,
    Compare,
    Download,
    Embed,
    Embeddings,
    Evaluate,
    Export,
    Metatrain,
    Prepare,
    Pretrain,
    Published,
    Report,
    Section,
    Tune,
)
from leo.utils.errors import LeoInputError
from leo.utils.validation import build, one_line

DEFAULT_PARAMS = "params.yaml"


def params_path(path: str | os.PathLike | None = None) -> Path:
    """``path``, else ``$LEO_PARAMS``, else ``params.yaml`` in the working directory."""
    return Path(path if path is not None else os.environ.get("LEO_PARAMS", DEFAULT_PARAMS))


class Settings(Section):
    """Every section of ``params.yaml`` (see ``params.yaml`` for each key's meaning); each is
    required, so a section lost in an edit is named rather than replaced by defaults."""

    base: Base
    download: Download
    prepare: Prepare
    pretrain: Pretrain
    embed: Embed
    embeddings: Embeddings
    published: Published
    metatrain: Metatrain
    evaluate: Evaluate
    export: Export
    report: Report
    compare: Compare
    tune: Tune

    _where: str = PrivateAttr(default=DEFAULT_PARAMS)  # the file, for messages

    def where(self) -> str:
        """The file these settings came from (for messages)."""
        return self._where

    # ------------------------------------------------------------------ built configs
    @cached_property
    def run_configs(self) -> dict[str, tuple[LEOConfig, str]]:
        """``{run: (LEOConfig, preset name)}`` for every run of ``metatrain.runs``."""
        return {run: self._run_config(run) for run in self.metatrain.runs}

    def run_config(self, run: str, **overrides: Any) -> LEOConfig:
        """The LEO config of ``metatrain.runs.<run>`` (plus ``overrides``, validated too).

        Raises:
            LeoInputError: no such run, or a bad override.
        """
        self.require_run(run)
        cfg, _ = self.run_configs[run]
        if not overrides:
            return cfg
        return build(LEOConfig, {**cfg.to_dict(), **overrides}, "LEO config")

    def require_run(self, run: str) -> None:
        """Raise a one-line error unless ``run`` is a key of ``metatrain.runs``."""
        if run not in self.metatrain.runs:
            runs = ", ".join(self.metatrain.runs)
            raise LeoInputError(f"{self.where()}: no run 'metatrain.runs.{run}' (runs: {runs})")

    def _run_config(self, run: str) -> tuple[LEOConfig, str]:
        values = dict(self.metatrain.runs[run])
        preset = values.pop("preset", "default")
        values.pop("from_tune", None)  # where the tuned values come from, not a config field
        key = f"metatrain.runs.{run}"
        if not isinstance(preset, str) or preset not in PRESETS:
            raise LeoInputError(
                f"{self.where()}: {key}.preset: must be one of {', '.join(PRESETS)} "
                f"(got {preset!r})"
            )
        common = {"seed": self.base.seed, **self.metatrain.common}
        build(LEOConfig, {**PRESETS[preset], **common}, self.where(), "metatrain.common")
        cfg = build(LEOConfig, {**PRESETS[preset], **common, **values}, self.where(), key)
        return cfg, preset

    def pretrain_config(self, dataset: str | None = None):
        """The :class:`~leo.backbone.pretrain.PretrainConfig` of ``dataset`` (default: base's)."""
        from leo.backbone.config import PretrainConfig

        dataset = dataset or self.base.dataset
        values = {
            **self.pretrain.for_dataset(dataset),
            "heldout_fraction": self.pretrain.heldout_fraction,
            "eval_batch_size": self.pretrain.eval_batch_size,
            "seed": self.base.seed,
        }
        return build(PretrainConfig, values, self.where(), f"pretrain.{dataset}")

    def maml_overrides(self, run: str) -> dict[str, Any]:
        """``compare.maml`` with ``compare.maml_runs.<run>`` on top."""
        return {**self.compare.maml, **self.compare.maml_runs.get(run, {})}

    # ------------------------------------------------------------------ cross-checks
    def check(self) -> Settings:
        """Build every derived config and check references between sections."""
        self.run_configs  # noqa: B018 - builds (and so validates) every run's config
        for name, info in type(self.pretrain).model_fields.items():
            if isinstance(getattr(self.pretrain, name), dict):
                self.pretrain_config(info.alias or name)
        self._check_embeddings()
        self._check_compare()
        self._check_tune()
        return self

    def from_tune(self, run: str) -> bool:
        """Whether ``metatrain@<run>`` trains with ``tune@<run>``'s hyperparameters."""
        return bool(self.metatrain.runs[run].get("from_tune", False))

    def tune_space(self, run: str):
        """The validated search space of ``tune.runs.<run>`` (``tune.space`` with the run's
        own entries on top), as :class:`leo.tune.space.Dimension` by name."""
        from leo.tune.space import make_space

        base, where, own = self.run_configs[run][0], self.where(), self.tune.runs[run].space
        space = make_space(self.tune.space, base, where, "tune.space")
        space.update(make_space(own, base, where, f"tune.runs.{run}.space"))
        if not space:
            raise LeoInputError(f"{where}: tune.space: no hyperparameter to search for run {run}")
        return space

    def _check_tune(self) -> None:
        for run, spec in self.metatrain.runs.items():
            flag = spec.get("from_tune", False)
            key = f"metatrain.runs.{run}.from_tune"
            if not isinstance(flag, bool):
                raise LeoInputError(f"{self.where()}: {key}: must be true or false (got {flag!r})")
            if flag and run not in self.tune.runs:
                raise LeoInputError(
                    f"{self.where()}: {key}: no tune.runs.{run} to take the values from"
                )
        for run in self.tune.runs:
            if run not in self.metatrain.runs:
                raise LeoInputError(f"{self.where()}: tune.runs.{run}: not a run of metatrain.runs")
            self.tune_space(run)

    def _check_embeddings(self) -> None:
        parts = Path(self.embeddings.dir).parts
        if len(parts) == 3 and parts[:2] == ("data", "published"):
            if parts[2] not in self.published.imports:
                names = ", ".join(self.published.imports) or "none"
                raise LeoInputError(
                    f"{self.where()}: embeddings.dir: {self.embeddings.dir} names no entry of "
                    f"published.imports (entries: {names})"
                )

    def _check_compare(self) -> None:
        from leo.comparison.maml_config import MAMLConfig
        from leo.comparison.registry import MAML_SHARED_FIELDS, METHODS, REFERENCE

        compare = self.compare
        for i, name in enumerate(compare.methods):
            if name not in METHODS:
                raise LeoInputError(
                    f"{self.where()}: compare.methods[{i}]: unknown method {name!r} "
                    f"(one of {', '.join(METHODS)})"
                )
            if name in compare.methods[:i]:
                raise LeoInputError(
                    f"{self.where()}: compare.methods[{i}]: {name!r} is listed twice"
                )
        if REFERENCE not in compare.methods:
            raise LeoInputError(
                f"{self.where()}: compare.methods: must include {REFERENCE!r} (the reference)"
            )
        for run in compare.maml_runs:
            if run not in self.metatrain.runs:
                raise LeoInputError(
                    f"{self.where()}: compare.maml_runs.{run}: not a run of metatrain.runs"
                )
        for run, (cfg, _) in self.run_configs.items():
            shared = {k: getattr(cfg, k) for k in MAML_SHARED_FIELDS}
            build(MAMLConfig, {**shared, **compare.maml}, self.where(), "compare.maml")
            key = f"compare.maml_runs.{run}"
            build(MAMLConfig, {**shared, **self.maml_overrides(run)}, self.where(), key)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML mapping, read as DVC reads params (YAML 1.2); one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise LeoInputError(f"{path}: params file not found")
    try:
        doc = YAML(typ="safe", pure=True).load(path.read_text())
    except YAMLError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise LeoInputError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(doc, dict):
        raise LeoInputError(f"{path}: expected a mapping at the top level")
    return doc


def parse_settings(doc: dict[str, Any], where: str = DEFAULT_PARAMS) -> Settings:
    """Validate a parsed ``params.yaml`` document: every section and every derived config.

    Raises:
        LeoInputError: the first problem, as ``<where>: <dotted.key>: <what>``.
    """
    try:
        settings = Settings.model_validate(doc)
    except ValidationError as err:
        raise one_line(err, where) from None
    settings._where = where
    return settings.check()


def load_settings(path: str | os.PathLike | None = None) -> Settings:
    """Read and validate ``params.yaml`` (default: :func:`params_path`)."""
    path = params_path(path)
    return parse_settings(read_yaml(path), str(path))


def load_run_config(run: str = "1shot", params: str | os.PathLike | None = None, **overrides):
    """The pipeline's LEO config of ``metatrain.runs.<run>`` in ``params``, plus overrides.

    Example: ``load_run_config("5shot", num_steps=500)`` is what ``metatrain@5shot`` trains
    with, shortened (the pipeline's Omniglot schedule: see ``params.yaml``).
    """
    return load_settings(params).run_config(run, **overrides)
