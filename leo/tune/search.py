"""Population-based training of LEO on Ray Tune: connect, search, summarize.

:func:`search` runs Ray Tune's ``PopulationBasedTraining`` scheduler over the trials of
:mod:`leo.tune.trial`: ``population`` members start from :func:`leo.tune.space.initial_population`,
each meta-trains ``steps`` outer steps, and every ``perturbation_interval`` steps the
scheduler ranks them by meta-validation accuracy; each member of the bottom
``quantile_fraction`` copies the whole state of one of the top (exploit) and perturbs its
hyperparameters (explore: each float times 0.8 or 1.2, a choice moved to a neighbour,
either resampled with ``resample_probability``; then clamped into the space, which Ray Tune
does not do, by ``custom_explore_fn``). By default (``synch``, as ``params.yaml``) every
member reaches the interval before any is ranked, and with the scheduler's random choices
seeded (:func:`seeded_pbt`, a subclass because Ray Tune draws them from Python's global
generator) the search is repeatable; ``synch=False`` ranks a trial when it reports
(asynchronous: a little faster, and two runs may differ). A trial that dies is restarted
from its last checkpoint up to ``max_failures`` times.

Where it runs (:func:`connect`): an existing Ray cluster when ``address`` (or
``$RAY_ADDRESS``) names one, else a local Ray started for the search and stopped after.
Each trial asks for ``cpus_per_trial`` CPUs and ``gpus_per_trial`` GPUs (fractions share a
GPU: 0.25 puts four trials on one). Checkpoints go to ``storage`` (on a cluster of several
machines, a path every node sees, or a URI such as ``s3://...`` that Ray can write), and
are removed when the search ends.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import math
import os
import random
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from leo.core.config import LEOConfig
from leo.tune.lineage import Summary, result_row, summarize, trial_name
from leo.tune.space import Dimension, clamp, initial_population
from leo.tune.trial import TrialSetup, trainable
from leo.utils.errors import LeoInputError

CHECKPOINTS_KEPT = None  # all, until the search ends: an exploit shares the source's checkpoint


class Collector(Callback):
    """Keeps every trial's results on the driver (:func:`leo.tune.lineage.result_row`)."""

    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self.results.append(result_row(trial.trial_id, result))


@dataclass(frozen=True)
class SearchSettings:
    """One search (the ``tune`` section of ``params.yaml`` and one of its runs).

    Attributes:
        name: the search's name (the run), for Ray's experiment folder and messages.
        space: the searched dimensions.
        population: trials (at least 2).
        steps: outer steps of each trial.
        perturbation_interval: outer steps between rankings (and validations).
        cpus_per_trial, gpus_per_trial: Ray resources of a trial.
        device: ``auto``, ``cpu`` or ``cuda[:i]`` inside a trial.
        address: a Ray cluster's address (None: ``$RAY_ADDRESS``, else a local Ray).
        storage: where Ray keeps the trials' checkpoints.
        max_failures: restarts of a dying trial from its last checkpoint.
        quantile_fraction, resample_probability, perturbation_factors: PBT's exploit and
            explore settings (Ray Tune's defaults).
        seed: seeds the population's draws and the scheduler's choices.
        synch: rank only when every trial reached the interval (repeatable; False:
            asynchronous, a little faster, not repeatable).
        reuse_actors: let a trial start in the process another trial left (no new process,
            no new torch import); False: a new process on the node the scheduler chose.
        where: how to name the settings in messages (e.g. ``params.yaml: tune``).
    """

    name: str
    space: dict[str, Dimension]
    population: int
    steps: int
    perturbation_interval: int
    storage: str | Path
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    device: str = "auto"
    address: str | None = None
    max_failures: int = 2
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    perturbation_factors: tuple[float, float] = (1.2, 0.8)
    seed: int = 0
    synch: bool = True
    reuse_actors: bool = True
    where: str = "tune"

    def __post_init__(self) -> None:
        if self.population < 2:
            raise LeoInputError(
                f"{self.where}: population must be at least 2 (got {self.population})"
            )
        if not 1 <= self.perturbation_interval <= self.steps:
            raise LeoInputError(
                f"{self.where}: perturbation_interval must be between 1 and steps ({self.steps}), "
                f"got {self.perturbation_interval}"
            )


@dataclass
class SearchResult:
    """What :func:`search` returns: the summary, the population it started from, where it ran."""

    summary: Summary
    population: list[dict[str, Any]]
    base: LEOConfig
    wall_seconds: float
    nodes: int
    resources: dict[str, float] = field(default_factory=dict)


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``host:port`` or ``ray://host:port``; None for ``auto``/``local``."""
    rest = address.removeprefix("ray://")
    if rest in ("auto", "local") or ":" not in rest:
        return None
    host, _, port = rest.rpartition(":")
    if not port.isdigit():
        return None
    return host.strip("[]"), int(port)


@contextmanager
def connect(address: str | None, where: str = "tune", timeout_s: float = 5.0) -> Iterator[str]:
    """Ray, for the duration of the block: the running one in this process, the cluster at
    ``address`` (else ``$RAY_ADDRESS``), or a local Ray started here and stopped after.

    Yields:
        A description of what it connected to.

    Raises:
        LeoInputError: ``address`` (or ``$RAY_ADDRESS``) unreachable, naming it.
    """
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield "the Ray of this process"
        return
    env = os.environ.get("RAY_ADDRESS")
    target = address or env
    what = f"{where}.address {address!r}" if address else f"RAY_ADDRESS {env!r}"
    if target:
        endpoint = _host_port(target)
        if endpoint is None and target.removeprefix("ray://") not in ("auto", "local"):
            raise LeoInputError(f"{what}: not a Ray address (host:port, ray://host:port or auto)")
        if endpoint is not None:
            try:
                socket.create_connection(endpoint, timeout=timeout_s).close()
            except OSError as err:
                raise LeoInputError(
                    f"{what}: no Ray cluster reachable ({err.strerror or type(err).__name__})"
                ) from None
        try:
            ray.init(address=target, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise LeoInputError(f"{what}: cannot connect to Ray ({first})") from None
        described = f"the Ray cluster at {target}"
    else:
        os.environ.pop("RAY_ADDRESS", None)
        ray.init(include_dashboard=False, log_to_driver=False)
        described = "a local Ray"
    try:
        yield described
    finally:
        ray.shutdown()


def _check_resources(settings: SearchSettings) -> dict[str, float]:
    import ray

    have = ray.cluster_resources()
    for kind, need, key in (
        ("CPU", settings.cpus_per_trial, "cpus_per_trial"),
        ("GPU", settings.gpus_per_trial, "gpus_per_trial"),
    ):
        if need > 0 and have.get(kind, 0.0) < need:
            raise LeoInputError(
                f"{settings.where}.{key}: {need:g} {kind} per trial but the Ray cluster has "
                f"{have.get(kind, 0.0):g}"
            )
    return {k: have[k] for k in ("CPU", "GPU") if k in have}


def seeded_pbt(seed: int, **kwargs):
    """Ray Tune's ``PopulationBasedTraining`` whose random choices (which top trial a bottom
    one copies, explore's factors and resamples) come from generators seeded by ``seed``, the
    trial, its step and how many decisions it has had, so they do not depend on what else
    drew from Python's or numpy's global generators in between. Both are put back after
    each decision."""
    from ray.tune.schedulers import PopulationBasedTraining

    class SeededPBT(PopulationBasedTraining):
        def __init__(self, **options) -> None:
            super().__init__(**options)
            self.decisions: dict[str, int] = {}

        def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
            name = trial_name(trial.trial_id)
            self.decisions[name] = count = self.decisions.get(name, 0) + 1
            key = f"{seed}:{name}:{self._trial_state[trial].last_train_time}:{count}"
            digest = hashlib.sha256(key.encode()).digest()
            saved, saved_np = random.getstate(), np.random.get_state()
            random.seed(digest)
            np.random.seed(int.from_bytes(digest[:4], "little"))  # Domain.sample's generator
            try:
                return super()._checkpoint_or_exploit(
                    trial, tune_controller, upper_quantile, lower_quantile
                )
            finally:
                random.setstate(saved)
                np.random.set_state(saved_np)

    return SeededPBT(**kwargs)


def _first_error(grid) -> str | None:
    for result in grid:
        if result.error is not None:
            lines = str(result.error).strip().splitlines()
            return lines[-1] if lines else type(result.error).__name__
    return None


def search(
    base: LEOConfig,
    settings: SearchSettings,
    train,
    val,
    *,
    progress: bool = False,
    callbacks: list | None = None,
) -> SearchResult:
    """Population-based training of ``base``'s searched hyperparameters on ``train``/``val``.

    Args:
        base: the run's LEO config (its own values are the population's first member).
        settings: the search.
        train, val: EmbeddingSplits (meta-training, and meta-validation: the fitness).
        progress: let Ray Tune print its progress table.
        callbacks: more Ray Tune callbacks (loggers, monitors) for the run.

    Raises:
        LeoInputError: an unreachable cluster, or trials that ask for more than it has.
        RuntimeError: a trial failed more than ``max_failures`` times.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    base = dataclasses.replace(
        base, num_steps=settings.steps, validate_every=settings.perturbation_interval
    )
    population = initial_population(settings.space, base, settings.population, settings.seed)
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")  # Collector keeps results
    if not progress:  # the stage prints its own lines; Ray Tune's tables and notes are noise
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        logging.getLogger("ray.tune").setLevel(logging.ERROR)
    local = "://" not in str(settings.storage)  # a path, not a URI
    storage = str(Path(settings.storage).resolve()) if local else str(settings.storage)
    if local:
        shutil.rmtree(Path(storage) / settings.name, ignore_errors=True)
    start = time.perf_counter()
    with connect(settings.address, settings.where) as described:
        resources = _check_resources(settings)
        print(
            f"tune {settings.name}: {settings.population} trials x {settings.steps} steps, "
            f"perturbation every {settings.perturbation_interval}, on {described} "
            f"({', '.join(f'{v:g} {k}' for k, v in resources.items())})",
            flush=True,
        )
        setup = TrialSetup(
            base=base.to_dict(),
            space=settings.space,
            device=settings.device,
            cpu_threads=max(1, math.floor(settings.cpus_per_trial)),
            train=train,
            val=val,
        )
        scheduler = seeded_pbt(
            settings.seed,
            time_attr="step",
            metric="val_accuracy",
            mode="max",
            perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations={k: d.ray_domain() for k, d in settings.space.items()},
            quantile_fraction=settings.quantile_fraction,
            resample_probability=settings.resample_probability,
            perturbation_factors=settings.perturbation_factors,
            custom_explore_fn=functools.partial(clamp, settings.space),
            log_config=False,
            synch=settings.synch,
        )
        collector = Collector()
        tuner = tune.Tuner(
            tune.with_resources(
                tune.with_parameters(trainable, setup=setup),
                {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
            ),
            param_space={k: d.ray_sampler() for k, d in settings.space.items()},
            tune_config=tune.TuneConfig(
                scheduler=scheduler,
                search_alg=BasicVariantGenerator(points_to_evaluate=population),
                num_samples=settings.population,
                reuse_actors=settings.reuse_actors,
            ),
            run_config=tune.RunConfig(
                name=settings.name,
                storage_path=storage,
                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                checkpoint_config=tune.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
                callbacks=[collector, *(callbacks or [])],
                stop={"step": settings.steps},  # the last result ends a trial, no last exploit
                verbose=1 if progress else 0,
            ),
        )
        grid = tuner.fit()
        error = _first_error(grid)
        if error is not None:
            raise RuntimeError(f"tune {settings.name}: a trial failed: {error}")
    summary = summarize(collector.results)
    if local:
        shutil.rmtree(Path(storage) / settings.name, ignore_errors=True)
    return SearchResult(
        summary=summary,
        population=population,
        base=base,
        wall_seconds=time.perf_counter() - start,
        nodes=len(summary.nodes),
        resources=resources,
    )
