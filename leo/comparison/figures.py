"""The paper's Figure 2: a joint t-SNE of LEO's latent codes before and after adaptation.

Rusu et al. (2019), section 4.2: 1000 random 5-way 1-shot validation episodes; the 5000
class codes ``z_n`` from the encoder and their adapted codes ``z_n'`` are embedded together
by t-SNE and shown (a) coloured by before (blue) / after (orange) adaptation, and (b)
coloured by class. Episodes come from the evaluation sampler
(:func:`leo.meta.evaluate.eval_sampler`) with a fixed seed; adaptation is evaluation-mode
(means, no dropout, the eval step counts).

The t-SNE is openTSNE's (Poličar et al., 2019; :func:`tsne_map`): affinities calibrated to
the perplexity on the exact ``3 * perplexity`` nearest neighbours (about 1 s for 10,000 x 64,
and unlike Annoy's approximate search the same whatever the thread count); PCA
initialisation; early exaggeration 12 for the first ``min(250, iterations // 4)`` steps;
learning rate N / exaggeration (Belkina et al., 2019); momentum 0.8. Repulsion is by FFT
interpolation (Linderman et al., 2019) during early exaggeration, where the map is compact
and the FFT grid stays at its minimum of 50 intervals a side, then by Barnes-Hut with theta
0.8: once the map spreads over a few hundred units the FFT grid (one interval per unit)
costs several times more than the tree. Measured on 10,000 codes (64-d) of a LEO model
meta-trained on synthetic clusters, 1000 iterations, one thread, the project's shared 2-core
CPU, 2026-12-02 (CPU seconds of the optimisation on Annoy's affinities; exact KL of the
final map): FFT throughout 92.8 s, KL 1.846; Barnes-Hut theta 0.5 throughout 44.3 s, KL
1.849; this module's FFT then theta 0.8, 25.9 s, KL 1.842 (theta 0.9: 2-4 s less, KL about
0.015 higher over three seeds). Whole :func:`figure2` runs took 30-31 s with another job on
the second core. A coarser FFT grid throughout (two units an
interval) was faster (18.5 s on other synthetic codes) but drew square clusters and ended at
KL 1.18 where the full grid reached 1.10. The map depends on the codes, the perplexity, the
iterations and the seed (the PCA's jitter), not on the thread count.

Besides the PNG, :func:`figure2` returns summary numbers computed on the codes themselves
(Z dimensions, not the map) with scikit-learn: how far adaptation moves a code, and how well
codes separate by class before and after (leave-one-out 1-nearest-neighbour class agreement
and the silhouette). A class's codes in different episodes can come from the same image, so
the neighbour agreement is a descriptive number, not a held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openTSNE
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors
from torch import Tensor

from leo.core.config import LEOConfig
from leo.core.model import Params
from leo.core.step import BatchAdapter
from leo.meta.evaluate import eval_sampler
from leo.utils.atomic import atomic_path
from leo.utils.errors import LeoInputError

FIGURE2_SEED = 2019  # episodes of the figure: fixed, and apart from evaluation's seed (1)
BEFORE, AFTER = "#1f77b4", "#ff7f0e"  # the paper's blue and orange (matplotlib C0, C1)
LEGEND_MAX_CLASSES = 10  # panel (b) names its classes up to this many (tab10); a note beyond
EARLY_EXAGGERATION = 12.0  # the factor on P, and its phase: min(250, iterations // 4) steps
EARLY_ITERATIONS = 250
MOMENTUM = 0.8
BARNES_HUT_THETA = 0.8  # after early exaggeration (module docstring)
TSNE_METHOD = (
    f"openTSNE {openTSNE.__version__}: exact-kNN affinities, PCA init, FFT repulsion during "
    f"early exaggeration, then Barnes-Hut theta {BARNES_HUT_THETA}"
)


def latent_codes(
    params: Params,
    cfg: LEOConfig,
    val_split,
    *,
    episodes: int,
    seed: int,
    shots: int = 1,
    batch_size: int = 200,
    device=None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Class codes before and after adaptation for ``episodes`` seeded validation episodes.

    Args:
        params: LEO parameters; cfg: their config (``num_classes`` N and eval step counts).
        val_split: an EmbeddingSplit (the validation meta-set).
        episodes: E, the number of N-way ``shots``-shot episodes.
        seed: the episode generator's seed.
        shots: K; with K > 1 a class's code is its mean over the K shots.
        batch_size: episodes adapted at once.
        device: where to adapt (default: the split's device).

    Returns:
        ``(z, z_adapted, classes)``: (E*N, Z), (E*N, Z) and (E*N,) split class labels, row
        ``e*N + n`` being class slot n of episode e. The episodes are fixed by ``seed`` and
        ``batch_size`` (batches draw in turn from one generator, as in evaluation).
    """
    cfg = dataclasses.replace(cfg, num_shots=shots, compile=False)  # a few batches: eager
    sampler = eval_sampler(val_split, cfg, device)
    params = {k: v.to(sampler.device) for k, v in params.items()}
    adapter = BatchAdapter(cfg)
    gen = torch.Generator(device=sampler.device).manual_seed(seed)
    before, after, classes = [], [], []
    for start in range(0, episodes, batch_size):
        idx = sampler.indices(min(batch_size, episodes - start), gen)
        out = adapter(params, sampler.gather(idx.support))
        before.append(out["z_init"].mean(dim=2).flatten(0, 1))  # (B, N, K, Z) -> (B*N, Z)
        after.append(out["z_adapted"].mean(dim=2).flatten(0, 1))
        classes.append(idx.classes.flatten())
    return torch.cat(before), torch.cat(after), torch.cat(classes)


@dataclass(frozen=True)
class TSNEMap:
    """What :func:`tsne_map` returns.

    Attributes:
        embedding: (M, 2) the map.
        kl_divergence: KL(P || Q) of the final map, openTSNE's estimate (Barnes-Hut's Z).
        perplexity: the perplexity the affinities were calibrated to.
        iterations: gradient steps in all; ``exaggeration_iterations`` of them exaggerated.
        exaggeration_iterations: the early-exaggeration steps.
        seconds: wall time, affinities included.
    """

    embedding: np.ndarray
    kl_divergence: float
    perplexity: float
    iterations: int
    exaggeration_iterations: int
    seconds: float


def tsne_map(
    x: np.ndarray,
    *,
    perplexity: float = 30.0,
    iterations: int = 1000,
    seed: int = 0,
    threads: int = 1,
) -> TSNEMap:
    """A 2-d t-SNE map of ``x`` with openTSNE (module docstring for the settings and cost).

    Args:
        x: (M, D) points.
        perplexity: effective number of neighbours; at most (M - 1) / 3.
        iterations: gradient steps in all, early exaggeration included.
        seed: seeds the jitter of the PCA initialisation.
        threads: openTSNE's worker threads (the map does not depend on them).

    Raises:
        LeoInputError: fewer than 4 points, a perplexity out of (0, (M - 1) / 3], or no
            iterations.
    """
    start = time.perf_counter()
    m = len(x)
    if m < 4 or not 0.0 < perplexity <= (m - 1) / 3:
        raise LeoInputError(
            f"t-SNE: perplexity {perplexity} needs 0 < perplexity <= (M - 1) / 3 with M = {m} "
            "points (at least 4)"
        )
    if iterations < 1:
        raise LeoInputError(f"t-SNE: iterations must be >= 1, got {iterations}")
    x = np.ascontiguousarray(x, dtype=np.float64)
    early = min(EARLY_ITERATIONS, iterations // 4)
    affinities = openTSNE.affinity.PerplexityBasedNN(
        x, perplexity=perplexity, method="exact", n_jobs=threads, random_state=seed
    )
    init = openTSNE.initialization.pca(x, random_state=seed)
    embedding = openTSNE.TSNEEmbedding(
        init, affinities, n_jobs=threads, random_state=seed, negative_gradient_method="fft"
    )
    if early:
        embedding = embedding.optimize(early, exaggeration=EARLY_EXAGGERATION, momentum=MOMENTUM)
    embedding = embedding.optimize(
        iterations - early,
        exaggeration=1.0,
        momentum=MOMENTUM,
        negative_gradient_method="bh",
        theta=BARNES_HUT_THETA,
    )
    return TSNEMap(
        np.asarray(embedding).copy(),
        float(embedding.kl_divergence),
        float(perplexity),
        iterations,
        early,
        time.perf_counter() - start,
    )


def nearest_neighbour_agreement(x: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out 1-nearest-neighbour label agreement: the fraction of points whose
    nearest other point (Euclidean; a duplicate counts) has the same label.

    Args:
        x: (M, D) points; labels: (M,) labels.
    """
    labels = np.asarray(labels)
    neighbours = NearestNeighbors(n_neighbors=1).fit(x)
    nearest = neighbours.kneighbors(return_distance=False)[:, 0]  # each point's, itself left out
    return float((labels[nearest] == labels).mean())


def silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    """Mean silhouette ``(b - a) / max(a, b)``, Euclidean (Rousseeuw 1987; scikit-learn's).

    ``a``: mean distance to the other points of the own label; ``b``: the smallest mean
    distance to the points of another label; points alone in their label score 0.

    Args:
        x: (M, D) points; labels: (M,) labels.

    Returns:
        The mean over the points, or None where it is undefined (fewer than 2 labels, or
        every point its own label).
    """
    if not 2 <= len(np.unique(labels)) <= len(x) - 1:
        return None
    return float(silhouette_score(x, labels))


def _class_colours(num: int, seed: int) -> np.ndarray:
    """(num, 4) RGBA: tab10 up to 10 classes; beyond, turbo at shuffled, evenly spaced
    positions (saturated colours, and classes with neighbouring labels get unlike ones)."""
    from matplotlib import colormaps

    if num <= 10:
        return colormaps["tab10"](np.arange(num))
    positions = np.random.default_rng(seed).permutation(num) / max(num - 1, 1)
    return colormaps["turbo"](0.05 + 0.9 * positions)


def _draw(
    out_png: Path,
    y: np.ndarray,
    kind: np.ndarray,
    cls: np.ndarray,
    names: list[str],
    title: str,
    *,
    seed: int,
    figsize: tuple[float, float],
    dpi: int,
) -> None:
    """Two panels over the same map y (M, 2): (a) by kind (0 before, 1 after), (b) by class."""
    m = len(y)
    order = np.random.default_rng(seed).permutation(m)  # interleave: neither set hides the other
    size = float(np.clip(12000.0 / m, 3.0, 25.0))  # marker area, pt^2
    uniq, cls_index = np.unique(cls, return_inverse=True)
    palette = _class_colours(len(uniq), seed)
    panels = [
        ("(a) before and after adaptation", np.where(kind[:, None] == 0, *_rgba(BEFORE, AFTER))),
        ("(b) coloured by class", palette[cls_index]),
    ]
    fig = Figure(figsize=figsize, dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    centre = (y.max(axis=0) + y.min(axis=0)) / 2
    half = 0.53 * float((y.max(axis=0) - y.min(axis=0)).max()) or 1.0  # a square, 6% margin
    for ax, (panel_title, colours) in zip(axes, panels, strict=True):
        ax.scatter(y[order, 0], y[order, 1], c=colours[order], s=size, alpha=0.7, linewidths=0)
        ax.set_title(panel_title, fontsize=13)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlim(centre[0] - half, centre[0] + half)
        ax.set_ylim(centre[1] - half, centre[1] + half)
        ax.set_aspect("equal", adjustable="box")

    def handle(colour, label):
        return Line2D([], [], marker="o", ls="", color=colour, markersize=9, label=label)

    below = {"loc": "upper center", "bbox_to_anchor": (0.5, -0.02), "frameon": False}
    axes[0].legend(
        handles=[
            handle(BEFORE, r"encoder output $\mathbf{z}$"),
            handle(AFTER, r"adapted $\mathbf{z}'$"),
        ],
        ncol=2,
        fontsize=12,
        **below,
    )
    if len(uniq) <= LEGEND_MAX_CLASSES:
        labels = [_short(names[c]) for c in uniq]
        handles = [handle(palette[i], lab) for i, lab in enumerate(labels)]
        # as many columns as fit under the panel: a legend wider than its axes makes the
        # constrained layout give up silently (titles then overlap)
        panel_pt = 72.0 * figsize[0] / 2 * 0.85
        column_pt = 10 * (0.65 * max(len(lab) for lab in labels) + 4)  # fontsize 10
        ncol = max(1, min(len(uniq), 5, int(panel_pt // column_pt)))
        axes[1].legend(handles=handles, ncol=ncol, fontsize=10, **below)
    else:
        axes[1].set_xlabel(f"one colour per class: {len(uniq)} validation classes", fontsize=12)
    fig.suptitle(title, fontsize=14)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)


def _rgba(*colours: str) -> list[np.ndarray]:
    from matplotlib.colors import to_rgba

    return [np.array(to_rgba(c)) for c in colours]


def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[: width - 1] + "\u2026"


def figure2(
    params: Params,
    cfg: LEOConfig,
    val_split,
    out_png: str | Path,
    *,
    episodes: int = 1000,
    seed: int = FIGURE2_SEED,
    perplexity: float = 30.0,
    shots: int = 1,
    iterations: int = 1000,
    device=None,
    threads: int | None = None,
    figsize: tuple[float, float] = (13.0, 7.0),
    dpi: int = 120,
) -> dict:
    """Draw Figure 2 for a LEO model on ``val_split`` and return its summary numbers.

    Cost at the paper's size (1000 episodes, 10,000 points): the t-SNE, about 25-30 s on
    one CPU thread (module docstring); adapting the codes and drawing, a few seconds.

    Args:
        params, cfg: the model (e.g. from :func:`leo.meta.train.load_checkpoint`).
        val_split: the validation EmbeddingSplit.
        out_png: where the PNG goes (written atomically); ``figsize * dpi`` pixels.
        episodes: E validation episodes (the paper: 1000, so 2 * 5000 points).
        seed: seeds the episodes, the t-SNE initialisation's jitter and the drawing order.
        perplexity: t-SNE perplexity; lowered to (M - 1) / 3 for M <= 3 * perplexity points.
        shots: K of the episodes (the paper: 1); K > 1 uses each class's mean code.
        iterations: t-SNE gradient steps, early exaggeration included.
        device: where to adapt (default: the split's device); the t-SNE runs on the CPU.
        threads: the t-SNE's CPU threads (None: every core; the map is the same whatever
            the threads, only the time changes: 29 s on one core, 21 s on two, here).
        figsize, dpi: figure size in inches and resolution.

    Returns:
        JSON-ready dict: counts, ``mean_shift`` (mean ``|z' - z|``), the mean code norms,
        1-NN class agreement and silhouette of the codes before and after adaptation (in Z
        dimensions; a silhouette is None where undefined), ``tsne_kind_agreement`` (1-NN
        before/after agreement in the map: 1.0 = the two sets apart, as in the paper), the
        t-SNE's KL (to 6 decimals: openTSNE sums it in the threads' order, so the digits
        beyond vary with them, the map does not), perplexity, iterations, method, threads and
        time.
    """
    start = time.perf_counter()
    z0, z1, classes = latent_codes(
        params, cfg, val_split, episodes=episodes, seed=seed, shots=shots, device=device
    )
    z0, z1 = (z.detach().cpu().double().numpy() for z in (z0, z1))
    classes = classes.cpu().numpy()
    codes = len(z0)
    kind = np.repeat([0, 1], codes)
    perplexity = min(perplexity, (2 * codes - 1) / 3)
    threads = (os.cpu_count() or 1) if threads is None else threads
    result = tsne_map(
        np.concatenate([z0, z1]),
        perplexity=perplexity,
        iterations=iterations,
        seed=seed,
        threads=threads,
    )
    title = (
        f"LEO latent codes of {episodes} validation episodes "
        f"({cfg.num_classes}-way {shots}-shot): joint t-SNE of {2 * codes} codes"
    )
    both = np.concatenate([classes, classes])
    names = list(val_split.class_names)
    _draw(
        Path(out_png),
        result.embedding,
        kind,
        both,
        names,
        title,
        seed=seed,
        figsize=figsize,
        dpi=dpi,
    )
    return {
        "png": str(out_png),
        "episodes": episodes,
        "way": cfg.num_classes,
        "shots": shots,
        "codes": codes,
        "classes": int(len(np.unique(classes))),
        "latent_dim": int(z0.shape[1]),
        "mean_shift": float(np.linalg.norm(z1 - z0, axis=1).mean()),
        "mean_norm_before": float(np.linalg.norm(z0, axis=1).mean()),
        "mean_norm_after": float(np.linalg.norm(z1, axis=1).mean()),
        "nn_class_agreement_before": nearest_neighbour_agreement(z0, classes),
        "nn_class_agreement_after": nearest_neighbour_agreement(z1, classes),
        "silhouette_before": silhouette(z0, classes),
        "silhouette_after": silhouette(z1, classes),
        "tsne_kind_agreement": nearest_neighbour_agreement(result.embedding, kind),
        "tsne_kl": round(result.kl_divergence, 6),  # its last digits vary with the threads
        "tsne_perplexity": perplexity,
        "tsne_iterations": iterations,
        "tsne_exaggeration_iterations": result.exaggeration_iterations,
        "tsne_method": TSNE_METHOD,
        "tsne_threads": threads,
        "tsne_seconds": result.seconds,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }


def note_png(out_png: str | Path, text: str, *, dpi: int = 100) -> None:
    """A small PNG that says, in words, why a figure was not drawn (``out_png`` is declared
    as a plot of the pipeline, so it exists whatever the settings)."""
    fig = Figure(figsize=(6, 1.2), dpi=dpi)
    FigureCanvasAgg(fig)
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=11, wrap=True)
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, format="png")
