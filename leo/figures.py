"""The paper's Figure 2: a joint t-SNE of LEO's latent codes before and after adaptation.

Rusu et al. (2019), section 4.2: 1000 random 5-way 1-shot validation episodes; the 5000
class codes ``z_n`` from the encoder and their adapted codes ``z_n'`` are embedded together
by t-SNE and shown (a) coloured by before (blue) / after (orange) adaptation, and (b)
coloured by class. Episodes come from the evaluation sampler (:func:`leo.evaluate.eval_sampler`)
with a fixed seed; adaptation is evaluation-mode (means, no dropout, the eval step counts).

Besides the PNG, :func:`figure2` returns summary numbers computed in torch on the codes
themselves (Z dimensions, not the map): how far adaptation moves a code, and how well codes
separate by class before and after (leave-one-out 1-nearest-neighbour class agreement and
the silhouette). A class's codes in different episodes can come from the same image, so the
neighbour agreement is a descriptive number, not a held-out accuracy.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from torch import Tensor

from leo.atomic import atomic_path
from leo.batched import BatchAdapter
from leo.config import LEOConfig
from leo.evaluate import eval_sampler
from leo.model import Params
from leo.tsne import nearest_neighbour_agreement, silhouette, tsne

FIGURE2_SEED = 2019  # episodes of the figure: fixed, and apart from evaluation's seed (1)
BEFORE, AFTER = "#1f77b4", "#ff7f0e"  # the paper's blue and orange (matplotlib C0, C1)
LEGEND_MAX_CLASSES = 10  # panel (b) names its classes up to this many (tab10); a note beyond


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
    figsize: tuple[float, float] = (13.0, 7.0),
    dpi: int = 120,
) -> dict:
    """Draw Figure 2 for a LEO model on ``val_split`` and return its summary numbers.

    Args:
        params, cfg: the model (e.g. from :func:`leo.train.load_checkpoint`).
        val_split: the validation EmbeddingSplit.
        out_png: where the PNG goes (written atomically); ``figsize * dpi`` pixels.
        episodes: E validation episodes (the paper: 1000, so 2 * 5000 points).
        seed: seeds the episodes, the t-SNE initialisation and the drawing order.
        perplexity: t-SNE perplexity; lowered to (M - 1) / 3 for M <= 3 * perplexity points.
        shots: K of the episodes (the paper: 1); K > 1 uses each class's mean code.
        iterations: t-SNE gradient steps.
        device: where to adapt and run t-SNE (default: the split's device).
        figsize, dpi: figure size in inches and resolution.

    Returns:
        JSON-ready dict: counts, ``mean_shift`` (mean ``|z' - z|``), the mean code norms,
        1-NN class agreement and silhouette of the codes before and after adaptation (in Z
        dimensions), ``tsne_kind_agreement`` (1-NN before/after agreement in the map: 1.0 =
        the two sets apart, as in the paper), the t-SNE's KL, time and perplexity.
    """
    start = time.perf_counter()
    z0, z1, classes = latent_codes(
        params, cfg, val_split, episodes=episodes, seed=seed, shots=shots, device=device
    )
    codes = len(z0)
    x = torch.cat([z0, z1]).float()
    kind = torch.cat([torch.zeros(codes), torch.ones(codes)]).to(x.device, torch.int64)
    both = torch.cat([classes, classes]).to(x.device)
    perplexity = min(perplexity, (2 * codes - 1) / 3)
    result = tsne(x, perplexity=perplexity, iterations=iterations, seed=seed)
    y = result.embedding
    title = (
        f"LEO latent codes of {episodes} validation episodes "
        f"({cfg.num_classes}-way {shots}-shot): joint t-SNE of {2 * codes} codes"
    )
    _draw(
        Path(out_png),
        y.cpu().double().numpy(),
        kind.cpu().numpy(),
        both.cpu().numpy(),
        list(val_split.class_names),
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
        "classes": int(classes.unique().numel()),
        "latent_dim": int(z0.shape[1]),
        "mean_shift": float((z1 - z0).norm(dim=1).mean()),
        "mean_norm_before": float(z0.norm(dim=1).mean()),
        "mean_norm_after": float(z1.norm(dim=1).mean()),
        "nn_class_agreement_before": nearest_neighbour_agreement(z0.float(), classes),
        "nn_class_agreement_after": nearest_neighbour_agreement(z1.float(), classes),
        "silhouette_before": silhouette(z0.float(), classes),
        "silhouette_after": silhouette(z1.float(), classes),
        "tsne_kind_agreement": nearest_neighbour_agreement(y, kind),
        "tsne_kl": result.kl_divergence,
        "tsne_perplexity": perplexity,
        "tsne_iterations": iterations,
        "tsne_seconds": result.seconds,
        "tsne_compiled": result.compiled,
        "seed": seed,
        "seconds": time.perf_counter() - start,
    }
