"""Baselines that need no meta-training, on the same frozen embeddings as LEO.

Each is a :data:`leo.meta.evaluate.Classifier`: support (B, N, K, D) -> weights (B, N, D) and bias
(B, N) or None, logit[x, n] = x . w_n + b_n, scored by the same protocol and episodes as LEO.

- Nearest class mean, cosine: c_n = mean_k x_nk normalised to unit length; the logit is
  x . c_n, which orders classes by cosine similarity (||x|| is the same for every class).
- Nearest class mean, Euclidean: -||x - c_n||^2 = 2 x . c_n - ||c_n||^2 - ||x||^2, and
  ||x||^2 is the same for every class: weights 2 c_n, bias -||c_n||^2.
- Logistic regression on the support set: a softmax classifier with bias fitted per episode
  by full-batch gradient descent, all episodes of the batch at once (see
  :class:`LogisticRegressionConfig` for the objective and the step size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from leo.meta.evaluate import Classifier


def class_means(support: Tensor) -> Tensor:
    """Prototypes: (B, N, K, D) -> (B, N, D), the mean over the K shots."""
    return support.mean(dim=2)


def nearest_mean_cosine(support: Tensor) -> tuple[Tensor, None]:
    """Cosine nearest class mean: weights are the unit-length prototypes, (B, N, D)."""
    return F.normalize(class_means(support), dim=-1), None


def nearest_mean_euclidean(support: Tensor) -> tuple[Tensor, Tensor]:
    """Euclidean nearest class mean: weights 2 c (B, N, D), bias -||c||^2 (B, N)."""
    c = class_means(support)
    return 2.0 * c, -c.square().sum(dim=-1)


@dataclass(frozen=True)
class LogisticRegressionConfig:
    """Multinomial logistic regression fitted on each episode's support set.

    Objective (per episode, the support examples x_i with labels y_i, M = N * K of them):
    ``sum_i CE(x_i W^T + b, y_i) + (l2 / 2) ||W||^2`` (the bias is not penalised). With the
    default ``l2 = 1`` this is scikit-learn's ``LogisticRegression(C=1.0)`` objective, the
    usual "linear probe" baseline for frozen few-shot features.

    Step size: gradient descent from W = 0, b = 0 with step 1 / L, where
    ``L = lambda_max(A^T A) / 2 + l2`` bounds the curvature (A = [x_i, 1], the inputs with
    the bias feature; the softmax cross-entropy Hessian is at most 1/2 in the logits). A step
    of 1 / L never increases a convex objective with an L-Lipschitz gradient, so the loss
    decreases monotonically, and the objective is (l2)-strongly convex in W, so it converges
    linearly. L is computed per episode from the (M, M) Gram matrix (cheap for M <= 25).
    """

    steps: int = 100  # full-batch gradient steps per episode
    l2: float = 1.0  # lambda: weight of (1/2) ||W||^2 against the SUMMED cross-entropy


def _objective(logits: Tensor, theta: Tensor, onehot: Tensor, l2: float) -> Tensor:
    """Per-episode objective: logits (B, M, N), theta (B, N, D+1), onehot (B, M, N) -> (B,)."""
    ce = -(onehot * torch.log_softmax(logits, dim=-1)).sum(dim=(1, 2))
    return ce + 0.5 * l2 * theta[..., :-1].square().sum(dim=(1, 2))


def fit_logistic_regression(
    support: Tensor, cfg: LogisticRegressionConfig = LogisticRegressionConfig()
) -> tuple[Tensor, Tensor, Tensor]:
    """Fit one softmax classifier per episode by gradient descent (closed-form gradients).

    Args:
        support: (B, N, K, D); row n of each episode is class n.
        cfg: iterations and L2 weight.

    Returns:
        weights (B, N, D), bias (B, N), and the objective before each step and after the
        last, (steps + 1, B).
    """
    b, n, k, d = support.shape
    x = support.reshape(b, n * k, d)
    a = torch.cat([x, x.new_ones(b, n * k, 1)], dim=-1)  # (B, M, D+1) with the bias feature
    labels = torch.arange(n, device=x.device).repeat_interleave(k)
    onehot = F.one_hot(labels, n).to(x.dtype).expand(b, n * k, n)
    gram = a @ a.transpose(1, 2)  # (B, M, M): same nonzero eigenvalues as A^T A
    lipschitz = 0.5 * torch.linalg.eigvalsh(gram)[:, -1] + cfg.l2  # (B,)
    step = (1.0 / lipschitz)[:, None, None]
    penalised = torch.ones(d + 1, dtype=x.dtype, device=x.device)
    penalised[-1] = 0.0  # no L2 on the bias
    theta = x.new_zeros(b, n, d + 1)
    losses = []
    for _ in range(cfg.steps):
        logits = a @ theta.transpose(1, 2)  # (B, M, N)
        losses.append(_objective(logits, theta, onehot, cfg.l2))
        p = torch.softmax(logits, dim=-1)
        grad = (p - onehot).transpose(1, 2) @ a + cfg.l2 * theta * penalised  # (B, N, D+1)
        theta = theta - step * grad
    losses.append(_objective(a @ theta.transpose(1, 2), theta, onehot, cfg.l2))
    return theta[..., :-1], theta[..., -1], torch.stack(losses)


def logistic_regression(cfg: LogisticRegressionConfig = LogisticRegressionConfig()) -> Classifier:
    """Logistic regression on the support set as a batched :data:`Classifier`."""

    def classify(support: Tensor) -> tuple[Tensor, Tensor]:
        weights, bias, _ = fit_logistic_regression(support, cfg)
        return weights, bias

    return classify
