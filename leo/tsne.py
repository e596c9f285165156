"""Exact t-SNE (van der Maaten & Hinton, 2008) in torch, plus class-separation scores.

The method, as in van der Maaten's reference implementations (``tsne.py``, ``bhtsne``):

1. Conditional affinities ``p_{j|i} = exp(-beta_i d_ij) / sum_k exp(-beta_i d_ik)`` over
   squared Euclidean distances ``d_ij``, with ``beta_i`` found by bisection so that the
   row's entropy ``H_i = -sum_j p_{j|i} log p_{j|i}`` equals ``log(perplexity)`` (nats).
2. Joint affinities ``P = (P_cond + P_cond^T) / (2N)``, summing to 1.
3. Student-t similarities ``w_ij = 1 / (1 + |y_i - y_j|^2)``, ``q_ij = w_ij / Z`` with
   ``Z = sum_{k != l} w_kl``.
4. Gradient of ``KL(P || Q)``: ``dC/dy_i = 4 sum_j (p_ij - q_ij) w_ij (y_i - y_j)``, split as
   ``4 (A_i - R_i / Z)`` with ``A_i = sum_j p_ij w_ij (y_i - y_j)`` (attraction) and
   ``R_i = sum_j w_ij^2 (y_i - y_j)`` (repulsion), so one pass over the pairs suffices.
   Early exaggeration multiplies P (in A only) by ``early_exaggeration``.
5. Gradient descent with momentum and per-coordinate gains: a gain grows by 0.2 where the
   gradient's sign disagrees with the last update's and shrinks by x0.8 where it agrees,
   never below ``min_gain``; the map is re-centred after every step.

Complexity (N points, D input dims, ``dims`` output dims): affinities O(N^2 D) for the
distances plus O(N^2) per bisection step (about 20-40 steps); every iteration O(N^2 dims).
Memory: the dense joint P, ``4 N^2`` bytes (400 MB at N = 10,000), plus one block of
``block_rows x N`` floats per temporary; nothing else is N x N. Everything runs in the
input's dtype on the input's device (float32 on CPU or CUDA; float64 for tests).

Measured on the project's shared 2-core CPU (torch 2.14, other jobs running): N = 10,000
points of 64 dims, 1000 iterations, compiled: 93-169 s wall in all (affinities ~15 s, then
~0.08-0.15 s per iteration; compiling adds 10-20 s the first time per N, less from
inductor's disk cache). The eager row blocks are about 10x slower per iteration on CPU.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from leo.errors import LeoInputError

_BLOCK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 26}  # temporaries: ~1 MB on CPU (cache-sized)
COMPILE_MIN_POINTS = 2000  # compile="auto" on CPU from here (below, compiling costs more)


@dataclass
class TSNEResult:
    """What :func:`tsne` returns.

    Attributes:
        embedding: (N, dims) the map, centred.
        kl_divergence: KL(P || Q) of the final map (without exaggeration).
        perplexity: the perplexity the affinities were calibrated to.
        iterations: gradient steps taken.
        seconds: wall time, affinities included.
        compiled: whether the fused (``torch.compile``) kernels ran.
    """

    embedding: Tensor
    kl_divergence: float
    perplexity: float
    iterations: int
    seconds: float
    compiled: bool


def _block_rows(n: int, device: torch.device, block_rows: int | None) -> int:
    if block_rows is not None:
        return max(1, min(n, block_rows))
    return max(1, min(n, _BLOCK_ELEMENTS.get(device.type, 1 << 22) // max(n, 1)))


def _sq_dists(xb: Tensor, x: Tensor, sq: Tensor, sq_b: Tensor) -> Tensor:
    """Squared distances (b, N) between rows ``xb`` (b, D) and ``x`` (N, D); norms given."""
    d = torch.addmm(sq[None, :], xb, x.T, alpha=-2.0)
    return d.add_(sq_b[:, None]).clamp_(min=0.0)


# The two O(N^2) inner loops, written as broadcasts and row reductions over the contiguous
# column axis: eager on row blocks, or compiled (inductor fuses each into one vectorised pass
# over the whole matrix, with no N x N temporary; about 10x faster on CPU). Both include the
# diagonal pair (d_ii = 0: p = 1, w = 1) and the callers subtract it.
def _entropy_sums(d: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """Row sums of exp(-beta d) and of d exp(-beta d); d (b, N), beta (b,) -> (b,), (b,)."""
    p = torch.exp(-d * beta[:, None])
    return p.sum(dim=1), (d * p).sum(dim=1)


def _gradient_sums(pb: Tensor, yb: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Attraction A (b, dims), repulsion R (b, dims) and row sums of w (b,) of rows ``yb``.

    Args:
        pb: (b, N) rows of P; yb: (b, dims) their map points; y: (N, dims) all map points.
    """
    cols = [y[:, k] for k in range(y.shape[1])]
    w = 1.0 / (1.0 + sum((yb[:, k, None] - c[None, :]).square() for k, c in enumerate(cols)))
    pw, ww = pb * w, w * w
    pw_sum, ww_sum = pw.sum(dim=1), ww.sum(dim=1)
    attract = torch.stack(
        [yb[:, k] * pw_sum - (pw * c[None, :]).sum(dim=1) for k, c in enumerate(cols)], dim=1
    )
    repel = torch.stack(
        [yb[:, k] * ww_sum - (ww * c[None, :]).sum(dim=1) for k, c in enumerate(cols)], dim=1
    )
    return attract, repel, w.sum(dim=1)


_COMPILED: dict = {}


def _kernel(fn, compiled: bool):
    """``fn`` itself, or its ``torch.compile`` (static shapes: one compile per N; dynamo's
    recompile limit, 8 shapes per process, then falls back to eager on whole matrices)."""
    if not compiled:
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


# ----------------------------------------------------------------------------- 1-2: P
def conditional_affinities(
    x: Tensor,
    perplexity: float = 30.0,
    *,
    tol: float = 1e-5,
    max_steps: int = 100,
    block_rows: int | None = None,
    compiled: bool = False,
) -> tuple[Tensor, Tensor]:
    """Row-stochastic Gaussian affinities calibrated to ``perplexity`` by bisection on beta.

    The distances of a row are shifted by their minimum first (p and H are unchanged, and
    nothing underflows however far apart the points are); beta starts at 1 / the row's mean
    shifted distance, doubles or halves until the target is bracketed, then bisects.

    Args:
        x: (N, D) points.
        perplexity: target ``exp(H_i)`` of every row; must be below N - 1.
        tol: stop when every row's ``|H_i - log(perplexity)| < tol`` (nats).
        max_steps: bisection steps at most (rows not converged by then are kept as they are).
        block_rows: rows per block (default: cache-sized; the whole matrix when compiled).
        compiled: run the bisection's inner loop through ``torch.compile``.

    Returns:
        ``(P_cond, beta)``: (N, N) with ``P_cond[i, j] = p_{j|i}``, zero diagonal, rows
        summing to 1; and (N,) the precisions ``beta_i = 1 / (2 sigma_i^2)``.

    Raises:
        LeoInputError: fewer than 3 points, or a perplexity out of (1, N - 1).
    """
    n = x.shape[0]
    if n < 3 or not 1.0 < perplexity < n - 1:
        raise LeoInputError(
            f"t-SNE: perplexity {perplexity} needs 1 < perplexity < N - 1 = {n - 1}"
        )
    target = math.log(perplexity)
    sums = _kernel(_entropy_sums, compiled)
    sq = x.square().sum(dim=1)
    d_all = x.new_empty(n, n)  # distances now, P_cond in place at the end
    betas = x.new_empty(n)
    step = _block_rows(n, x.device, block_rows)
    for lo in range(0, n, step):  # shifted squared distances, diagonal exactly 0
        hi = min(n, lo + step)
        d = _sq_dists(x[lo:hi], x, sq, sq[lo:hi])
        diag = (torch.arange(hi - lo, device=x.device), torch.arange(lo, hi, device=x.device))
        d[diag] = math.inf
        d_all[lo:hi] = d.sub_(d.amin(dim=1, keepdim=True))
        d_all[lo:hi][diag] = 0.0
    step = n if compiled else step
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        d = d_all[lo:hi]
        beta = (n - 1) / d.sum(dim=1).clamp(min=torch.finfo(x.dtype).tiny)
        b_min = torch.zeros_like(beta)
        b_max = torch.full_like(beta, math.inf)
        for tries in range(max_steps):
            s, sd = sums(d, beta)
            s = s - 1.0  # minus the diagonal's exp(0); s >= 1 (the nearest neighbour's term)
            diff = torch.log(s) + beta * sd / s - target  # H_i - log(perplexity)
            if tries == max_steps - 1 or bool((diff.abs() < tol).all()):
                break
            high = diff > 0  # entropy too high: narrower Gaussian, larger beta
            b_min = torch.where(high, beta, b_min)
            b_max = torch.where(high, b_max, beta)
            grow = torch.where(b_max.isinf(), beta * 2.0, (beta + b_max) / 2.0)
            beta = torch.where(high, grow, (beta + b_min) / 2.0)
        betas[lo:hi] = beta
    step = _block_rows(n, x.device, block_rows)
    for lo in range(0, n, step):  # p_{j|i} in place of the distances
        hi = min(n, lo + step)
        p = d_all[lo:hi].mul_(-betas[lo:hi, None]).exp_()
        p[torch.arange(hi - lo, device=x.device), torch.arange(lo, hi, device=x.device)] = 0.0
        p.div_(p.sum(dim=1, keepdim=True))
    return d_all, betas


def joint_affinities(
    x: Tensor, perplexity: float = 30.0, *, block_rows: int | None = None, **kwargs
) -> Tensor:
    """Symmetric joint affinities ``P = (P_cond + P_cond^T) / (2N)``, (N, N), summing to 1.

    Symmetrised in place, tile by tile, so the peak memory is one N x N matrix.

    Args:
        x: (N, D) points; perplexity, block_rows and ``kwargs`` as
            :func:`conditional_affinities`.
    """
    p, _ = conditional_affinities(x, perplexity, block_rows=block_rows, **kwargs)
    n = p.shape[0]
    step = max(1, math.isqrt(_BLOCK_ELEMENTS.get(x.device.type, 1 << 22)))
    for i in range(0, n, step):
        for j in range(i, n, step):
            tile = (p[i : i + step, j : j + step] + p[j : j + step, i : i + step].T) / (2 * n)
            p[i : i + step, j : j + step] = tile
            p[j : j + step, i : i + step] = tile.T
    return p


# ----------------------------------------------------------------------------- 3-4: KL
def kl_gradient(
    p: Tensor,
    y: Tensor,
    *,
    exaggeration: float = 1.0,
    block_rows: int | None = None,
    compiled: bool = False,
) -> Tensor:
    """Exact gradient of KL(P || Q) with respect to the map; one pass over the pairs.

    Args:
        p: (N, N) joint affinities (symmetric, zero diagonal, summing to 1).
        y: (N, dims) the map.
        exaggeration: factor on P in the attraction term (early exaggeration).
        block_rows: rows per block when eager (compiled: the whole matrix in one pass).
        compiled: use the ``torch.compile``-fused pass.

    Returns:
        (N, dims) ``4 (exaggeration * A - R / Z)`` (module docstring, point 4).
    """
    n = y.shape[0]
    if compiled:
        attract, repel, w_rows = _kernel(_gradient_sums, True)(p, y, y)
    else:
        step = _block_rows(n, y.device, block_rows)
        parts = [
            _gradient_sums(p[lo : lo + step], y[lo : lo + step], y) for lo in range(0, n, step)
        ]
        attract, repel, w_rows = (torch.cat(t) for t in zip(*parts, strict=True))
    z = w_rows.sum() - n  # Z excludes the N diagonal terms w_ii = 1
    return 4.0 * (exaggeration * attract - repel / z)


def kl_divergence(p: Tensor, y: Tensor, *, block_rows: int | None = None) -> float:
    """KL(P || Q) = sum p log p - sum p log w + log Z (sum p = 1), by row blocks."""
    n = y.shape[0]
    sq = y.square().sum(dim=1)
    z = y.new_zeros((), dtype=torch.float64)
    cross = y.new_zeros((), dtype=torch.float64)
    step = _block_rows(n, y.device, block_rows)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        pb = p[lo:hi]
        w = _sq_dists(y[lo:hi], y, sq, sq[lo:hi]).add_(1.0).reciprocal_()
        z = z + w.sum(dtype=torch.float64)
        cross = cross + (torch.xlogy(pb, pb) - torch.xlogy(pb, w)).sum(dtype=torch.float64)
    return float(cross + torch.log(z - n) * p.sum(dtype=torch.float64))


# ----------------------------------------------------------------------------- 5: descent
def initial_map(x: Tensor, dims: int, init: str, seed: int) -> Tensor:
    """Starting map (N, dims), standard deviation 1e-4 along its first axis.

    ``"pca"``: the top principal components of ``x`` (signs fixed: each component's
    largest-magnitude loading positive), as scikit-learn's ``init="pca"``; ``"random"``:
    ``1e-4 * N(0, I)`` from a CPU generator seeded with ``seed`` (as bhtsne).
    """
    n = x.shape[0]
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        return (1e-4 * torch.randn(n, dims, generator=gen, dtype=torch.float64)).to(x)
    if init != "pca":
        raise LeoInputError(f"t-SNE: init must be 'pca' or 'random', not {init!r}")
    xc = (x - x.mean(dim=0)).double()
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    comps = evecs[:, evals.argsort(descending=True)[:dims]]  # (D, dims)
    signs = torch.sign(comps.gather(0, comps.abs().argmax(dim=0, keepdim=True)))
    y = xc @ (comps * signs)
    if y.shape[1] < dims:  # D < dims: pad with zeros
        y = torch.cat([y, y.new_zeros(n, dims - y.shape[1])], dim=1)
    return (y / y[:, 0].std().clamp(min=1e-12) * 1e-4).to(x)


def tsne(
    x: Tensor,
    *,
    dims: int = 2,
    perplexity: float = 30.0,
    iterations: int = 1000,
    learning_rate: float | str = "auto",
    early_exaggeration: float = 12.0,
    exaggeration_iterations: int = 250,
    momentum: float = 0.5,
    final_momentum: float = 0.8,
    momentum_switch: int = 250,
    min_gain: float = 0.01,
    init: str = "pca",
    seed: int = 0,
    block_rows: int | None = None,
    compile: bool | str = "auto",
) -> TSNEResult:
    """Exact t-SNE of ``x`` (module docstring for the method and its cost).

    Args:
        x: (N, D) points (float32 or float64, any device); the map has the same dtype/device.
        dims: output dimensions.
        perplexity: effective number of neighbours (must be below N - 1).
        iterations: gradient steps.
        learning_rate: step size for the true gradient (with its factor 4); ``"auto"`` is
            ``max(N / early_exaggeration / 4, 50)`` (Belkina et al. 2019, scikit-learn), i.e.
            N / 12 in bhtsne's units (bhtsne's fixed 200 drops the factor 4).
        early_exaggeration: factor on P for the first ``exaggeration_iterations`` steps.
        momentum: momentum before ``momentum_switch`` steps; ``final_momentum`` after.
        min_gain: lower bound of the per-coordinate gains.
        init: ``"pca"`` or ``"random"`` (:func:`initial_map`).
        seed: seeds the random initialisation (PCA needs none; the result is deterministic).
        block_rows: rows per block of N-wide temporaries (default: cache-sized).
        compile: fuse the two O(N^2) loops with ``torch.compile`` (about 10x faster on CPU;
            compiling costs ~10-20 s once per N, less from inductor's disk cache); ``"auto"``:
            on CPU for N >= ``COMPILE_MIN_POINTS``, never on CUDA (eager blocks are fast there).

    Returns:
        :class:`TSNEResult` with the (N, dims) map and its final KL divergence.
    """
    start = time.perf_counter()
    n = x.shape[0]
    if learning_rate == "auto":
        learning_rate = max(n / early_exaggeration / 4.0, 50.0)
    if compile == "auto":
        compile = x.device.type == "cpu" and n >= COMPILE_MIN_POINTS
    compiled = bool(compile)
    p = joint_affinities(x, perplexity, block_rows=block_rows, compiled=compiled)
    y = initial_map(x, dims, init, seed)
    update = torch.zeros_like(y)
    gains = torch.ones_like(y)
    for it in range(iterations):
        exaggeration = early_exaggeration if it < exaggeration_iterations else 1.0
        mom = momentum if it < momentum_switch else final_momentum
        grad = kl_gradient(
            p, y, exaggeration=exaggeration, block_rows=block_rows, compiled=compiled
        )
        agree = (grad > 0) == (update > 0)
        gains = torch.where(agree, gains * 0.8, gains + 0.2).clamp_(min=min_gain)
        update = mom * update - learning_rate * gains * grad
        y = y + update
        y = y - y.mean(dim=0)
    kl = kl_divergence(p, y, block_rows=block_rows)
    seconds = time.perf_counter() - start
    return TSNEResult(y, kl, float(perplexity), iterations, seconds, compiled)


# ----------------------------------------------------------------------------- scores
def nearest_neighbour_agreement(
    x: Tensor, labels: Tensor, *, block_rows: int | None = None
) -> float:
    """Leave-one-out 1-nearest-neighbour label agreement: the fraction of points whose
    nearest other point (Euclidean) has the same label. x (N, D), labels (N,)."""
    n = x.shape[0]
    sq = x.square().sum(dim=1)
    hits = 0
    step = _block_rows(n, x.device, block_rows)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        d = _sq_dists(x[lo:hi], x, sq, sq[lo:hi])
        rows = torch.arange(hi - lo, device=x.device)
        d[rows, rows + lo] = math.inf
        hits += int((labels[d.argmin(dim=1)] == labels[lo:hi]).sum())
    return hits / n


def silhouette(x: Tensor, labels: Tensor, *, block_rows: int | None = None) -> float:
    """Mean silhouette ``(b - a) / max(a, b)`` with Euclidean distances (Rousseeuw 1987).

    ``a``: mean distance to the other points of the own label; ``b``: the smallest mean
    distance to the points of another label; points alone in their label score 0.

    Args:
        x: (N, D) points; labels: (N,) integer labels (at least two distinct).
    """
    n = x.shape[0]
    _, lab = torch.unique(labels, return_inverse=True)
    onehot = torch.nn.functional.one_hot(lab).to(x.dtype)  # (N, C)
    counts = onehot.sum(dim=0)
    sq = x.square().sum(dim=1)
    total = 0.0
    step = _block_rows(n, x.device, block_rows)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        d = _sq_dists(x[lo:hi], x, sq, sq[lo:hi]).sqrt_()
        rows = torch.arange(hi - lo, device=x.device)
        d[rows, rows + lo] = 0.0
        sums = d @ onehot  # (b, C)
        own = lab[lo:hi]
        own_count = counts[own]
        a = sums.gather(1, own[:, None])[:, 0] / (own_count - 1).clamp(min=1)
        other = (sums / counts).scatter(1, own[:, None], math.inf)
        b = other.amin(dim=1)
        s = (b - a) / torch.maximum(a, b).clamp(min=torch.finfo(x.dtype).tiny)
        total += float(torch.where(own_count > 1, s, 0.0).sum())
    return total / n
