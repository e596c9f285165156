"""The comparison of one shot configuration: every method on the same seeded test episodes.

For one run (a base :class:`~leo.config.LEOConfig`, e.g. ``metatrain@1shot``'s) :func:`compare`

1. trains what needs training (:func:`leo.methods.train_method`): the LEO ablations and MAML,
   each from the base config with ``num_steps``/``validate_every`` set by
   :class:`CompareSettings` (``train_steps=None``: the base's own, the fair setting); plain
   ``leo`` reuses the run's meta-trained checkpoint instead of training again;
2. scores every method with :func:`leo.evaluate.evaluate_classifier` on ONE sampler and ONE
   seed, so every method sees the same episodes (a digest of the episodes' indices is
   recorded per method to prove it), and compares each to ``leo`` episode by episode
   (:func:`leo.stats.paired_difference`);
3. measures test-time latent ensembles of the ``leo`` model
   (:func:`leo.ensemble.evaluate_ensembles`: mean-only and S = 1, 5, 20 samples; accuracy and
   ECE, paired to mean-only; on the first ``ensemble_episodes`` of the same test episodes
   when that is a multiple of the batch size);
4. draws the paper's Figure 2 for the ``leo`` model (:func:`leo.figures.figure2`) on
   validation episodes of the run's shots.

Outputs (all written atomically), under ``reports_dir``: ``table.json`` / ``table.md``,
``ensembles.json`` / ``ensembles.md``, ``figure2.png`` / ``figure2.json``; under ``data_dir``:
``<method>/best.pt`` of each trained method and ``accuracies.npz`` (per-episode accuracies
of every method, in episode order, for re-analysis).

``table.json``::

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

import dataclasses
import hashlib
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from leo.atomic import atomic_path, write_json, write_text
from leo.config import LEOConfig
from leo.ensemble import MEAN_ONLY, SAMPLE_COUNTS, evaluate_ensembles
from leo.errors import LeoInputError
from leo.evaluate import eval_sampler, evaluate_classifier
from leo.figures import figure2
from leo.methods import get_method, method_classifier, train_method
from leo.stats import mean_ci95, paired_difference
from leo.train import load_checkpoint

REFERENCE = "leo"


@dataclass(frozen=True)
class CompareSettings:
    """What a comparison trains and measures.

    Attributes:
        methods: names of :data:`leo.methods.METHODS`; must include ``"leo"``.
        train_steps: outer steps of each trained method (None: the base config's).
        validate_every: steps between meta-validations (None: the base config's).
        maml: MAMLConfig overrides (beyond the fields shared with the base config).
        num_episodes, batch_size, seed: the test episodes (as ``evaluate``).
        ensemble_episodes: episodes of the ensemble table (0: no table).
        ensemble_samples: the ensemble sizes S.
        noise_seed: seeds the ensembles' samples.
        figure_episodes: validation episodes of Figure 2 (0: no figure).
        figure_iterations: t-SNE gradient steps of Figure 2.
    """

    methods: tuple[str, ...]
    train_steps: int | None = None
    validate_every: int | None = None
    maml: dict[str, Any] = field(default_factory=dict)
    num_episodes: int = 10_000
    batch_size: int = 200
    seed: int = 1
    ensemble_episodes: int = 1000
    ensemble_samples: tuple[int, ...] = SAMPLE_COUNTS
    noise_seed: int = 0
    figure_episodes: int = 1000
    figure_iterations: int = 1000

    def __post_init__(self) -> None:
        for name in self.methods:
            get_method(name)
        if REFERENCE not in self.methods:
            raise LeoInputError(f"the methods must include {REFERENCE!r} (the reference)")
        if len(set(self.methods)) != len(self.methods):
            raise LeoInputError("a method is listed twice")


class RecordingSampler:
    """An :class:`~leo.episodes.EpisodeSampler` proxy hashing every episode it draws.

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
) -> dict[str, Path | None]:
    """Checkpoint of every method (None: nothing to train); ``leo`` is ``leo_checkpoint``.

    Each trained method goes to ``data_dir/<method>/``; a finished run there is reused.
    """
    cfg = training_base(base, settings)
    out: dict[str, Path | None] = {}
    for name in settings.methods:
        if name == REFERENCE:
            out[name] = Path(leo_checkpoint)
            continue
        extra = settings.maml if get_method(name).trainer == "maml" else {}
        out[name] = train_method(
            name, cfg, train, val, Path(data_dir) / name, device=device, **extra
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


def _pct(x: float | None) -> str:
    return "-" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _signed(x: float) -> str:
    return f"{100 * x:+.2f}" if np.isfinite(x) else "-"


def table_markdown(table: dict[str, Any]) -> str:
    """``table.md``: one row per method, accuracy and paired difference to LEO in points."""
    lines = [
        f"# {table['num_classes']}-way {table['num_shots']}-shot comparison (run `{table['run']}`)",
        "",
        f"{table['episodes']} test episodes (seed {table['seed']}), the same for every method "
        f"(indices sha256 `{table['episodes_sha256'][:16]}`). Accuracy in %, 95% CI half-width; "
        "difference = method - LEO in points, paired per episode.",
        "",
        "| method | accuracy (%) | ± 95% CI | Δ vs LEO | ± 95% CI | significant | steps "
        "(best) | what it is |",
        "|---|---:|---:|---:|---:|:---:|---:|---|",
    ]
    for name, row in table["methods"].items():
        is_ref = name == table["reference"]
        steps = "-" if row["num_steps"] is None else f"{row['num_steps']} ({row['best_step']})"
        lines.append(
            f"| {name} | {_pct(row['accuracy'])} | {_pct(row['ci95'])} | "
            f"{'—' if is_ref else _signed(row['difference'])} | "
            f"{'—' if is_ref else _pct(row['difference_ci95'])} | "
            f"{'—' if is_ref else ('yes' if row['significant'] else 'no')} | {steps} | "
            f"{row['summary']} |"
        )
    return "\n".join(lines) + "\n"


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


def ensembles_markdown(table: dict[str, Any]) -> str:
    """``ensembles.md``: accuracy, ECE and the paired difference to mean-only LEO."""
    lines = [
        f"# Test-time latent ensembles (run `{table['run']}`)",
        "",
        f"{table['episodes']} test episodes (seed {table['seed']}; sample noise seed "
        f"{table['noise_seed']}). Ensembles average the class probabilities of S sampled "
        "classifiers; ECE over 15 bins. Difference = predictor - mean-only in points, paired. "
        "A sampled classifier whose adaptation diverged (non-finite weights) is left out of "
        "its episode's average (none left: uniform probabilities).",
        "",
        "| predictor | accuracy (%) | ± 95% CI | ECE (%) | Δ vs mean-only | ± 95% CI | "
        "diverged classifiers |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in table["predictors"].items():
        ref = name == MEAN_ONLY
        lines.append(
            f"| {name} | {_pct(row['accuracy'])} | {_pct(row['ci95'])} | {_pct(row['ece'])} | "
            f"{'—' if ref else _signed(row['difference'])} | "
            f"{'—' if ref else _pct(row['difference_ci95'])} | "
            f"{row.get('diverged', 0)} of {row.get('classifiers', 0)} |"
        )
    return "\n".join(lines) + "\n"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())


def compare(
    run: str,
    base: LEOConfig,
    settings: CompareSettings,
    leo_checkpoint: str | Path,
    train,
    val,
    test,
    data_dir: str | Path,
    reports_dir: str | Path,
    *,
    device=None,
) -> dict[str, Any]:
    """Train, score and draw everything of one run; write the outputs; return table.json.

    Args:
        run: the run's name (for the reports).
        base: the run's LEO config (the one ``leo_checkpoint`` was meta-trained with).
        settings: what to train and measure.
        leo_checkpoint: the run's meta-trained LEO ``best.pt``.
        train, val, test: the EmbeddingSplits (test only for scoring).
        data_dir: checkpoints of trained methods and ``accuracies.npz``.
        reports_dir: the tables and the figure.
        device: torch device of training and evaluation.
    """
    start = time.perf_counter()
    data_dir, reports_dir = Path(data_dir), Path(reports_dir)
    _, leo_cfg, meta = load_checkpoint(leo_checkpoint)
    if meta.get("embedding_dim", test.dim) != test.dim:
        raise LeoInputError(
            f"{leo_checkpoint}: meta-trained on {meta['embedding_dim']}-d embeddings, but the "
            f"test split is {test.dim}-d"
        )
    checkpoints = train_methods(settings, base, leo_checkpoint, train, val, data_dir, device=device)
    accuracies, rows = score_methods(settings, base, checkpoints, test, device=device)
    rows = add_differences(accuracies, rows)
    _save_npz(data_dir / "accuracies.npz", accuracies)
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
    if settings.ensemble_episodes > 0:
        ens = {"run": run, **ensembles_table(params, leo_cfg, test, settings, device=device)}
        write_json(reports_dir / "ensembles.json", ens)
        write_text(reports_dir / "ensembles.md", ensembles_markdown(ens))
    if settings.figure_episodes > 0:
        summary = figure2(
            params,
            leo_cfg,
            val,
            reports_dir / "figure2.png",
            episodes=settings.figure_episodes,
            shots=leo_cfg.num_shots,
            iterations=settings.figure_iterations,
            device=device,
        )
        write_json(reports_dir / "figure2.json", summary)
    table["seconds"] = time.perf_counter() - start
    write_json(reports_dir / "table.json", table)
    write_text(reports_dir / "table.md", table_markdown(table))
    return table
