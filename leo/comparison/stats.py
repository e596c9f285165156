"""Statistics for comparing methods: 95% intervals, paired differences, calibration error.

Every method in a comparison is scored on the same seeded episodes
(:func:`leo.meta.evaluate.evaluate_classifier`), so two methods are compared episode by episode:
the paired difference's interval is over the per-episode differences, which removes the
variance the two share (hard episodes are hard for both) and is much tighter than the two
separate intervals suggest.

Calibration is the expected calibration error (ECE) of Guo et al. (2017): the predicted
class's probability ("confidence") is put in one of ``num_bins`` equal-width bins of [0, 1]
(bin i holds ``i / B < confidence <= (i + 1) / B``; a confidence of exactly 0 goes to bin 0),
and ECE = sum over bins of (bin count / total) * |bin accuracy - bin mean confidence|.
Bin totals add up over batches (:class:`CalibrationTotals`), so ECE over millions of queries
never holds all their probabilities at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

Z95 = 1.96  # two-sided 95% normal quantile, as the paper's intervals
ECE_BINS = 15


def _as_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def mean_ci95(values) -> tuple[float, float]:
    """Mean and 95% half-width ``1.96 * sample std (ddof=1) / sqrt(n)``.

    Args:
        values: (n,) per-episode values (array, list or tensor).

    Returns:
        (mean, half-width); the half-width is NaN for fewer than two values.
    """
    x = _as_numpy(values).reshape(-1)
    if x.size == 0:
        raise ValueError("mean_ci95: no values")
    half = Z95 * x.std(ddof=1) / math.sqrt(x.size) if x.size > 1 else float("nan")
    return float(x.mean()), float(half)


@dataclass(frozen=True)
class PairedDifference:
    """Method A minus method B over the same episodes.

    Attributes:
        mean: mean over episodes of ``a - b``.
        ci95: 95% half-width of that mean (over the per-episode differences).
        num_episodes: n.
        a_mean, b_mean: each method's own mean.
    """

    mean: float
    ci95: float
    num_episodes: int
    a_mean: float
    b_mean: float

    @property
    def significant(self) -> bool:
        """True when the 95% interval of the difference excludes zero."""
        return abs(self.mean) > self.ci95

    def to_dict(self) -> dict:
        return {
            "difference": self.mean,
            "ci95": self.ci95,
            "episodes": self.num_episodes,
            "a": self.a_mean,
            "b": self.b_mean,
            "significant": self.significant,
        }


def paired_difference(a, b) -> PairedDifference:
    """Paired difference of two methods' per-episode values.

    Args:
        a, b: (n,) per-episode accuracies of two methods on the SAME episodes, in order.

    Raises:
        ValueError: the two have different lengths.
    """
    xa, xb = _as_numpy(a).reshape(-1), _as_numpy(b).reshape(-1)
    if xa.shape != xb.shape:
        raise ValueError(
            f"paired_difference: {xa.size} and {xb.size} episodes; pairs need the same episodes"
        )
    mean, half = mean_ci95(xa - xb)
    return PairedDifference(mean, half, int(xa.size), float(xa.mean()), float(xb.mean()))


@dataclass
class CalibrationTotals:
    """Per-bin totals for ECE, accumulated over batches of predictions.

    Attributes:
        count: (num_bins,) predictions per bin.
        confidence: (num_bins,) sum of the confidences in each bin.
        correct: (num_bins,) number of correct predictions in each bin.
    """

    num_bins: int = ECE_BINS
    count: np.ndarray = field(init=False)
    confidence: np.ndarray = field(init=False)
    correct: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.count = np.zeros(self.num_bins, dtype=np.int64)
        self.confidence = np.zeros(self.num_bins, dtype=np.float64)
        self.correct = np.zeros(self.num_bins, dtype=np.int64)

    def add(self, confidence, correct) -> CalibrationTotals:
        """Add predictions: confidence (M,) in [0, 1] of the predicted class; correct (M,) bool.

        Returns:
            self, so ``CalibrationTotals().add(c, ok).ece`` reads in one line.

        Raises:
            ValueError: a confidence outside [0, 1] or NaN (a diverged classifier).
        """
        conf = _as_numpy(confidence).reshape(-1)
        ok = _as_numpy(correct).reshape(-1)
        if not np.all((conf >= 0.0) & (conf <= 1.0)):  # also refuses NaN
            raise ValueError("calibration: confidences must be probabilities in [0, 1]")
        # bin i holds (i/B, (i+1)/B]: ceil(c * B) - 1, with 0 put in bin 0
        bins = np.clip(np.ceil(conf * self.num_bins).astype(np.int64) - 1, 0, self.num_bins - 1)
        self.count += np.bincount(bins, minlength=self.num_bins)
        self.confidence += np.bincount(bins, weights=conf, minlength=self.num_bins)
        self.correct += np.bincount(bins, weights=ok, minlength=self.num_bins).astype(np.int64)
        return self

    def add_probabilities(self, probs, labels) -> CalibrationTotals:
        """Add predictions from class probabilities (M, C) and true labels (M,)."""
        p = _as_numpy(probs)
        y = _as_numpy(labels).astype(np.int64).reshape(-1)
        pred = p.argmax(axis=1)
        return self.add(p[np.arange(len(y)), pred], pred == y)

    @property
    def ece(self) -> float:
        """sum_b (n_b / n) |acc_b - conf_b| over non-empty bins."""
        total = self.count.sum()
        if total == 0:
            raise ValueError("ECE of no predictions")
        used = self.count > 0
        gap = np.abs(self.correct[used] - self.confidence[used])  # n_b (acc_b - conf_b)
        return float(gap.sum() / total)

    @property
    def accuracy(self) -> float:
        """Overall fraction of correct predictions."""
        return float(self.correct.sum() / self.count.sum())

    def reliability(self) -> dict[str, list]:
        """Per-bin (count, mean confidence, accuracy) for a reliability diagram (NaN: empty)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "bin_upper": [(i + 1) / self.num_bins for i in range(self.num_bins)],
                "count": self.count.tolist(),
                "confidence": (self.confidence / self.count).tolist(),
                "accuracy": (self.correct / self.count).tolist(),
            }


def expected_calibration_error(probs, labels, num_bins: int = ECE_BINS) -> float:
    """ECE of class probabilities ``probs`` (M, C) against integer ``labels`` (M,)."""
    return CalibrationTotals(num_bins).add_probabilities(probs, labels).ece
