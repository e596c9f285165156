"""One member of the population: the project's own trainer, driven an interval at a time.

A trial is :func:`leo.meta.train.meta_train` (the shared outer loop, :mod:`leo.meta.loop`)
run in segments of ``perturbation_interval`` outer steps (``stop_after``), with
``validate_every`` equal to that interval, so each segment ends with the loop's own
meta-validation (the same ``val_batches * val_batch_size`` episodes, seeded as metatrain
seeds them) and its own ``state.pt``: parameters, Adam moments, step, the generators'
states, best, history. That validation accuracy is the trial's fitness, and the segment's
``state.pt`` goes into the Ray Tune checkpoint it reports with, beside ``trial.json``
(``{"trial", "step", "hyperparameters"}``: who wrote it, when, with what).

Starting from a checkpoint is then one of two things:

- its own (a paused trial continuing, or one that died resuming): the loop resumes exactly;
- another trial's (PBT's exploit): the same exact resume of that trial's state, after
  :func:`adopt` has rewritten the config recorded in it to this trial's hyperparameters
  (explore's perturbation) and rescaled the learned step sizes for a changed step-size init
  (:data:`leo.tune.space.STEP_SIZE_INITS`). With unchanged hyperparameters the copy
  continues bit for bit as its source would have.

Every trial meta-trains from the same seed (the same initial parameters, batches and
noise: common random numbers), so fitness differences between trials come from their
hyperparameters, and every trial validates on the same episodes.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from leo.core.config import LEOConfig, config_from_dict
from leo.meta.loop import STATE_FILE
from leo.meta.train import meta_train
from leo.tune.space import STEP_SIZE_INITS, Dimension, apply
from leo.utils.atomic import write_json, write_torch
from leo.utils.device import resolve_device
from leo.utils.errors import LeoInputError

TRIAL_FILE = "trial.json"


@dataclass(frozen=True)
class TrialSetup:
    """What every trial shares (sent to the workers once, through Ray's object store).

    Attributes:
        base: the run's LEO config with ``num_steps`` = the search's steps and
            ``validate_every`` = the perturbation interval, as a plain dict.
        space: the searched dimensions.
        device: ``auto``, ``cpu`` or ``cuda[:i]``, resolved on the worker.
        cpu_threads: intra-op CPU threads of a trial.
        train, val: the meta-train and meta-validation EmbeddingSplits.
    """

    base: dict[str, Any]
    space: dict[str, Dimension]
    device: str
    cpu_threads: int
    train: Any
    val: Any

    def config(self, hyperparameters: dict[str, Any]) -> LEOConfig:
        """The trial's LEO config: the base with ``hyperparameters``."""
        return apply(config_from_dict(self.base), hyperparameters, "tune trial")

    @property
    def interval(self) -> int:
        return int(self.base["validate_every"])

    @property
    def num_steps(self) -> int:
        return int(self.base["num_steps"])


def searched(config: dict[str, Any], space: dict[str, Dimension]) -> dict[str, Any]:
    """The searched hyperparameters of a Ray trial config (its other keys dropped)."""
    return {k: config[k] for k in space}


def adopt(
    state_path: Path, source: dict[str, Any], hyperparameters: dict[str, Any], cfg: LEOConfig
) -> dict[str, list[Any]]:
    """Make ``state.pt``, saved with ``source``'s hyperparameters, continue under ``cfg``.

    The state's recorded config becomes ``cfg`` (so the loop resumes it) and each learned
    step-size vector whose init changed from ``a`` to ``b`` is multiplied by ``b / a``;
    everything else (parameters, Adam moments, step, generators, history) is kept as is.

    Returns:
        ``{name: [old, new]}`` of the hyperparameters that differ from ``source``'s.
    """
    changed = {
        k: [source[k], v] for k, v in hyperparameters.items() if k in source and source[k] != v
    }
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    for init, param in STEP_SIZE_INITS.items():
        if init in changed:
            old, new = changed[init]
            state["params"][param] = state["params"][param] * (new / old)
    state["config"] = cfg.to_dict()
    write_torch(state_path, state)
    return changed


def restore(checkpoint_dir: Path | None, work: Path, trial: str, setup: TrialSetup, hp: dict):
    """Put a checkpoint's state into ``work`` for this trial; return (step, exploit event).

    The event is None unless the checkpoint is another trial's:
    ``{"source", "source_step", "changed": {name: [old, new]}}``.
    """
    work.mkdir(parents=True, exist_ok=True)
    if checkpoint_dir is None:
        return 0, None
    meta = json.loads((checkpoint_dir / TRIAL_FILE).read_text())
    shutil.copy2(checkpoint_dir / STATE_FILE, work / STATE_FILE)
    if meta["trial"] == trial and meta["hyperparameters"] == hp:
        return int(meta["step"]), None
    changed = adopt(work / STATE_FILE, meta["hyperparameters"], hp, setup.config(hp))
    if meta["trial"] == trial:  # own checkpoint, new hyperparameters: never made by PBT
        return int(meta["step"]), None
    event = {"source": meta["trial"], "source_step": int(meta["step"]), "changed": changed}
    return int(meta["step"]), event


def segments(
    setup: TrialSetup, hp: dict[str, Any], work: Path, start: int
) -> Iterator[dict[str, Any]]:
    """Meta-train from ``start`` in intervals; after each, yield the loop's history row.

    ``work/state.pt`` then holds the state after that row's step.
    """
    cfg = setup.config(hp)
    device = resolve_device(setup.device, "tune.device")
    step = start
    while step < cfg.num_steps:
        until = min(step + setup.interval, cfg.num_steps)
        result = meta_train(
            cfg,
            setup.train,
            setup.val,
            work,
            device=device,
            progress=False,
            stop_after=until,
            cpu_threads=setup.cpu_threads,
        )
        if result.steps != until or not result.history:
            raise LeoInputError(f"tune trial: the loop stopped at step {result.steps}, not {until}")
        step = result.steps
        yield dict(result.history[-1])


def write_checkpoint(work: Path, dest: Path, trial: str, step: int, hp: dict[str, Any]) -> Path:
    """``dest`` holding ``work``'s ``state.pt`` and ``trial.json``: a trial's checkpoint."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(work / STATE_FILE, dest / STATE_FILE)
    write_json(dest / TRIAL_FILE, {"trial": trial, "step": step, "hyperparameters": hp})
    return dest


def trainable(config: dict[str, Any], setup: TrialSetup) -> None:
    """Ray Tune's function trainable: report fitness and a checkpoint every interval."""
    import ray
    from ray import tune

    trial = tune.get_context().get_trial_id()
    hp = searched(config, setup.space)
    node = ray.get_runtime_context().get_node_id()
    with tempfile.TemporaryDirectory(prefix="leo-trial-") as tmp:
        work = Path(tmp) / "run"
        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            step, event = restore(None, work, trial, setup, hp)
        else:
            with checkpoint.as_directory() as directory:
                step, event = restore(Path(directory), work, trial, setup, hp)
        for i, row in enumerate(segments(setup, hp, work, step)):
            dest = write_checkpoint(work, Path(tmp) / f"ckpt{i}", trial, int(row["step"]), hp)
            metrics = {
                **row,
                "step": int(row["step"]),
                "hyperparameters": dict(hp),
                "node": node,
                "exploit": event if i == 0 else None,
            }
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(dest)))
            shutil.rmtree(dest)
