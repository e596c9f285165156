"""The comparison of one shot configuration: every method on the same seeded test episodes.

For one run (a base :class:`~leo.core.config.LEOConfig`, e.g. ``metatrain@1shot``'s) :func:`compare`

1. trains what needs training (:func:`leo.comparison.methods.train_method`): the LEO ablations
   and MAML, each from the base config with ``num_steps``/``validate_every`` set by
   :class:`CompareSettings` (``train_steps=None``: the base's own, the fair setting); plain
   ``leo`` reuses the run's meta-trained checkpoint instead of training again;
2. scores every method with :func:`leo.meta.evaluate.evaluate_classifier` on ONE sampler and ONE
   seed, so every method sees the same episodes (a digest of the episodes' indices is
   recorded per method to prove it), and compares each to ``leo`` episode by episode
   (:func:`leo.comparison.stats.paired_difference`);
3. measures test-time latent ensembles of the ``leo`` model
   (:func:`leo.comparison.ensemble.evaluate_ensembles`: mean-only and S = 1, 5, 20 samples;
   accuracy and ECE, paired to mean-only; on the first ``ensemble_episodes`` of the same
   test episodes when that is a multiple of the batch size);
4. draws the paper's Figure 2 for the ``leo`` model (:func:`leo.comparison.figures.figure2`) on
   validation episodes of the run's shots.

Steps 3 and 4 are opt-in (``ensemble_episodes``, ``figure_episodes``; 0 by default). The
config the methods start from must be the one the LEO checkpoint was meta-trained with, up
to :data:`UNCHECKED_FIELDS` (:func:`check_base`, both in :mod:`leo.comparison.options`).

The files it writes are listed in :func:`compare`'s docstring; ``table.json``::

    {"run", "num_classes", "num_shots", "reference": "leo", "episodes", "seed",
     "episodes_sha256", "seconds",
     "methods": {name: {"summary", "trained", "num_steps", "best_step", "accuracy", "ci95",
                        "difference", "difference_ci95", "significant", "episodes",
                        "episodes_sha256", "seconds"}}}

``ensembles.json``::

    {"run", "episodes", "seed", "noise_seed", "seconds",
     "predictors": {"mean-only" | "ensemble-S": {"accuracy", "ci95", "ece", "episodes",
                                                 "difference", "difference_ci95",
                                                 "significant"}}}
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leo.comparison.ensemble import MEAN_ONLY, evaluate_ensembles
from leo.comparison.figures import figure2, note_png
from leo.comparison.methods import TUNED, get_method, method_classifier, train_method
from leo.comparison.options import REFERENCE, UNCHECKED_FIELDS, CompareSettings, check_base
from leo.comparison.stats import mean_ci95, paired_difference
from leo.comparison.tables import ensembles_markdown, table_markdown
from leo.core.config import LEOConfig
from leo.meta.evaluate import eval_sampler, evaluate_classifier
from leo.meta.train import load_checkpoint
from leo.utils.arrays import write_npz
from leo.utils.atomic import remove_path, write_json, write_text
from leo.utils.device import DEFAULT_CPU_THREADS, resolve_device
from leo.utils.device import cpu_threads as cpu_threads_of
from leo.utils.errors import LeoInputError
from leo.utils.live import open_live
from leo.utils.validation import build

__all__ = [
    "REFERENCE",
    "UNCHECKED_FIELDS",
    "CompareSettings",
    "RecordingSampler",
    "check_base",
    "compare",
]


class RecordingSampler:
    """An :class:`~leo.meta.episodes.EpisodeSampler` proxy hashing every episode it draws.

    ``digest`` is the sha256 of the classes, support and query indices of the episodes in
    order: two evaluations with equal digests scored exactly the same episodes.
    """

    def __init__(self, sampler) -> None:
        self._sampler = sampler
        self._hash = hashlib.sha256()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sampler, name)

    def indices(self, batch: int, generator: torch.Generator):
        """Draw ``batch`` episodes from the wrapped sampler and hash their indices."""
        idx = self._sampler.indices(batch, generator)
        for part in (idx.classes, idx.support, idx.query):
            self._hash.update(part.detach().cpu().to(torch.int64).numpy().tobytes())
        return idx

    @property
    def digest(self) -> str:
        return self._hash.hexdigest()


def training_base(base: LEOConfig, settings: CompareSettings) -> LEOConfig:
    """The base config the trained methods start from (step counts from ``settings``)."""
    steps = base.num_steps if settings.train_steps is None else settings.train_steps
    every = base.validate_every if settings.validate_every is None else settings.validate_every
    return dataclasses.replace(base, num_steps=steps, validate_every=min(every, steps))


def train_methods(
    settings: CompareSettings,
    base: LEOConfig,
    leo_checkpoint: str | Path,
    train,
    val,
    data_dir: str | Path,
    *,
    device=None,
    logs_dir: str | Path | None = None,
) -> dict[str, Path | None]:
    """Checkpoint of every method (None: nothing to train); ``leo`` is ``leo_checkpoint``.

    Each trained method goes to ``data_dir/<method>/``; a finished run there is reused.
    MAML's training history goes to a DVCLive log ``logs_dir/maml/`` (None: no log).
    """
    cfg = training_base(base, settings)
    out: dict[str, Path | None] = {}
    for name in settings.methods:
        if name == REFERENCE:
            out[name] = Path(leo_checkpoint)
            continue
        if name == TUNED:  # the base's own steps, as leo was trained: only the values differ
            tuned = build(LEOConfig, {**base.to_dict(), **(settings.tuned or {})}, "tuned")
            out[name] = train_method(name, tuned, train, val, Path(data_dir) / name, device=device)
            continue
        is_maml = get_method(name).trainer == "maml"
        extra = settings.maml if is_maml else {}
        log = Path(logs_dir) / name if is_maml and logs_dir is not None else None
        with open_live(log) if log is not None else contextlib.nullcontext() as live:
            out[name] = train_method(
                name, cfg, train, val, Path(data_dir) / name, device=device, live=live, **extra
            )
    return out


def _checkpoint_steps(path: Path | None) -> tuple[int | None, int | None]:
    """(configured num_steps, best step) of a checkpoint; (None, None) without one."""
    if path is None:
        return None, None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return int(obj["config"]["num_steps"]), int(obj.get("step", -1))


def score_methods(
    settings: CompareSettings,
    base: LEOConfig,
    checkpoints: dict[str, Path | None],
    test,
    *,
    device=None,
) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Per-episode accuracies and a row of the table for every method, same episodes.

    Returns:
        ({method: (num_episodes,) accuracies}, {method: row}); rows hold everything of
        ``table.json``'s ``methods`` entries except the paired differences.
    """
    accuracies, rows = {}, {}
    for name in settings.methods:
        sampler = RecordingSampler(eval_sampler(test, base, device))
        classifier = method_classifier(name, checkpoints[name], device=device)
        result = evaluate_classifier(
            classifier,
            sampler,
            num_episodes=settings.num_episodes,
            batch_size=settings.batch_size,
            seed=settings.seed,
            desc=name,
        )
        num_steps, best_step = _checkpoint_steps(checkpoints[name])
        mean, ci = mean_ci95(result.accuracies)
        accuracies[name] = result.accuracies
        rows[name] = {
            "summary": get_method(name).summary,
            "trained": checkpoints[name] is not None,
            "num_steps": num_steps,
            "best_step": best_step,
            "accuracy": mean,
            "ci95": ci,
            "episodes": result.num_episodes,
            "episodes_sha256": sampler.digest,
            "seconds": result.wall_seconds,
        }
    return accuracies, rows


def add_differences(
    accuracies: dict[str, np.ndarray], rows: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """Add each method's paired difference to ``leo`` (method minus LEO) to its row."""
    for name, row in rows.items():
        diff = paired_difference(accuracies[name], accuracies[REFERENCE])
        row.update(difference=diff.mean, difference_ci95=diff.ci95, significant=diff.significant)
    return rows


def ensembles_table(
    params, cfg: LEOConfig, test, settings: CompareSettings, *, device=None
) -> dict[str, Any]:
    """Mean-only LEO and S-sample ensembles on the first ``ensemble_episodes`` test episodes."""
    sampler = eval_sampler(test, cfg, device)
    results, seconds = evaluate_ensembles(
        {k: v.to(sampler.device) for k, v in params.items()},
        cfg,
        sampler,
        num_episodes=settings.ensemble_episodes,
        batch_size=settings.batch_size,
        seed=settings.seed,
        noise_seed=settings.noise_seed,
        sample_counts=settings.ensemble_samples,
    )
    predictors = {}
    for name, result in results.items():
        diff = paired_difference(result.accuracies, results[MEAN_ONLY].accuracies)
        predictors[name] = {
            **result.summary(),
            "difference": diff.mean,
            "difference_ci95": diff.ci95,
            "significant": diff.significant,
        }
    return {
        "episodes": settings.ensemble_episodes,
        "seed": settings.seed,
        "noise_seed": settings.noise_seed,
        "seconds": seconds,
        "predictors": predictors,
    }


def compare(
    run: str,
    base: LEOConfig | None,
    settings: CompareSettings | None,
    leo_checkpoint: str | Path,
    train,
    val,
    test,
    data_dir: str | Path,
    reports_dir: str | Path,
    *,
    device=None,
    cpu_threads: int | None = DEFAULT_CPU_THREADS,
) -> dict[str, Any]:
    """Compare every method of ``settings`` with a meta-trained LEO model on the same episodes.

    What it trains: each method of ``settings.methods`` that needs training (the LEO
    ablations through :func:`leo.meta.train.meta_train`, MAML through
    :func:`leo.comparison.maml.maml_train`; :data:`leo.comparison.methods.METHODS`) starts from
    ``base`` (MAML takes its shared fields, plus ``settings.maml``) and runs
    ``settings.train_steps`` outer steps (None: ``base.num_steps``) of ``base.batch_size``
    episodes of ``train``, validating on ``val`` every ``settings.validate_every`` steps
    (None: ``base.validate_every``) and keeping the best. A finished run under
    ``data_dir/<method>/`` is reused and an interrupted one resumed. ``leo-pbt`` is the
    exception: ``base`` with ``settings.tuned`` on top, for ``base.num_steps`` as ``leo``.
    Plain ``leo`` is the given checkpoint, never retrained; the baselines need no training.

    Then every method is scored on the same ``settings.num_episodes`` seeded episodes of
    ``test``, and, when asked, the ensembles and Figure 2 are measured (module docstring).

    Cost: training dominates; an ablation's step costs at most what a step of the run's
    meta-training cost (MAML's less), so with every method it is at most about five times
    ``train_steps`` meta-training steps (plus ``base.num_steps`` for ``leo-pbt``) and their
    validations. Scoring adapts
    ``num_episodes`` episodes per method; the ensembles ``ensemble_episodes * (1 +
    sum(ensemble_samples))`` adaptations; Figure 2 at 1000 episodes about 30 s on one CPU
    thread (its t-SNE: :mod:`leo.comparison.figures`).

    Args:
        run: a name for the reports.
        base: the LEO config the methods start from; it must equal the checkpoint's in every
            field but :data:`UNCHECKED_FIELDS` (execution, seed, and how long the others
            train). None: the checkpoint's config.
        settings: what to train and measure (None: :class:`CompareSettings` defaults: every
            method, no ensembles, no figure).
        leo_checkpoint: the meta-trained LEO ``best.pt`` (:func:`leo.meta.train.meta_train`).
        train, val, test: :class:`~leo.data.store.EmbeddingSplit` s of the same dimension,
            e.g. from :func:`leo.data.store.read_embeddings`: training, validation (model
            selection, Figure 2) and test (scoring) classes.
        data_dir: written: ``<method>/`` (each trained method's checkpoint and history) and
            ``accuracies.npz`` (per-episode accuracies of every method, episode order).
        reports_dir: written: ``table.json`` / ``table.md``; ``ensembles.json`` /
            ``ensembles.md`` when ``settings.ensemble_episodes > 0``; ``figure2.png`` /
            ``figure2.json`` when ``settings.figure_episodes > 0``; ``maml/`` (MAML's DVCLive
            training log) when MAML is compared. Every file is written atomically.
        device: where to train and score (None or "auto": CUDA when present, else the CPU).
        cpu_threads: torch's intra-op CPU threads while it runs (None: torch's setting);
            torch's setting is put back afterwards. Figure 2's t-SNE runs on every core
            (its map is the same whatever the threads).

    Returns:
        The content of ``table.json`` (module docstring): per method its accuracy and 95%
        interval, its paired difference to ``leo``, its training steps, and the digest of
        the episodes it was scored on.

    Raises:
        LeoInputError: an unreadable checkpoint, a config that differs from the checkpoint's,
            splits of other dimensions than the checkpoint's, or invalid settings.
    """
    settings = CompareSettings() if settings is None else settings
    if not isinstance(settings, CompareSettings):
        raise LeoInputError(f"settings must be CompareSettings or None, got {settings!r}")
    _, stored, meta = load_checkpoint(leo_checkpoint)
    base = check_base(base, stored, leo_checkpoint)
    want = meta.get("embedding_dim", test.dim)
    for name, split in zip(("train", "val", "test"), (train, val, test), strict=True):
        if split.dim != want:
            raise LeoInputError(
                f"{leo_checkpoint}: meta-trained on {want}-d embeddings, but the {name} split "
                f"is {split.dim}-d"
            )
    with cpu_threads_of(cpu_threads):
        return _compare(
            run,
            base,
            settings,
            Path(leo_checkpoint),
            (train, val, test),
            Path(data_dir),
            Path(reports_dir),
            resolve_device(device),
        )


def _compare(run, base, settings, leo_checkpoint, splits, data_dir, reports_dir, device):
    """:func:`compare` once its arguments are checked."""
    start = time.perf_counter()
    train, val, test = splits
    checkpoints = train_methods(
        settings, base, leo_checkpoint, train, val, data_dir, device=device, logs_dir=reports_dir
    )
    accuracies, rows = score_methods(settings, base, checkpoints, test, device=device)
    rows = add_differences(accuracies, rows)
    write_npz(data_dir / "accuracies.npz", **accuracies)
    table = {
        "run": run,
        "num_classes": base.num_classes,
        "num_shots": base.num_shots,
        "reference": REFERENCE,
        "episodes": settings.num_episodes,
        "seed": settings.seed,
        "episodes_sha256": rows[REFERENCE]["episodes_sha256"],
        "seconds": 0.0,
        "methods": rows,
    }
    params, _, _ = load_checkpoint(leo_checkpoint)
    _note_what_is_not_measured(reports_dir, settings)
    if settings.ensemble_episodes > 0:
        ens = {"run": run, **ensembles_table(params, base, test, settings, device=device)}
        write_json(reports_dir / "ensembles.json", ens)
        write_text(reports_dir / "ensembles.md", ensembles_markdown(ens))
    if settings.figure_episodes > 0:
        summary = figure2(
            params,
            base,
            val,
            reports_dir / "figure2.png",
            episodes=settings.figure_episodes,
            shots=base.num_shots,
            iterations=settings.figure_iterations,
            device=device,
        )
        write_json(reports_dir / "figure2.json", summary)
    table["seconds"] = time.perf_counter() - start
    write_json(reports_dir / "table.json", table)
    write_text(reports_dir / "table.md", table_markdown(table))
    return table


def _note_what_is_not_measured(reports_dir: Path, settings: CompareSettings) -> None:
    """The outputs of the parts switched off, saying so: the same files whatever the settings
    (the pipeline declares them all as outputs of ``compare@<run>``)."""
    if settings.ensemble_episodes == 0:
        why = "not measured: ensemble_episodes is 0"
        write_json(reports_dir / "ensembles.json", {"episodes": 0, "note": why})
        write_text(reports_dir / "ensembles.md", f"# Test-time latent ensembles\n\n{why}.\n")
    if settings.figure_episodes == 0:
        why = "Figure 2 not drawn: figure_episodes is 0"
        write_json(reports_dir / "figure2.json", {"episodes": 0, "note": why})
        note_png(reports_dir / "figure2.png", why)
    if not any(get_method(m).trainer == "maml" for m in settings.methods):
        log = reports_dir / "maml"
        remove_path(log)
        write_json(log / "metrics.json", {"note": "MAML is not among the compared methods"})
        (log / "plots" / "metrics").mkdir(parents=True, exist_ok=True)
