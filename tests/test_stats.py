"""Statistics: intervals and paired differences against numpy, ECE against hand-computed bins."""

import math

import numpy as np
import pytest
import torch

from leo.comparison.stats import (
    CalibrationTotals,
    expected_calibration_error,
    mean_ci95,
    paired_difference,
)


def test_mean_ci95_is_1_96_sample_std_over_sqrt_n():
    x = [0.2, 0.4, 0.6, 0.8, 1.0]
    mean, half = mean_ci95(torch.tensor(x, dtype=torch.float64))
    assert math.isclose(mean, 0.6)
    assert math.isclose(half, 1.96 * math.sqrt(0.1) / math.sqrt(5))
    assert math.isnan(mean_ci95([0.5])[1])


def test_paired_difference_matches_numpy_on_per_episode_differences():
    rng = np.random.default_rng(0)
    hardness = rng.uniform(0.3, 0.9, size=400)  # shared by both methods: cancels in pairs
    a = np.clip(hardness + 0.02 + rng.normal(0, 0.02, 400), 0, 1)
    b = np.clip(hardness + rng.normal(0, 0.02, 400), 0, 1)
    d = a - b
    got = paired_difference(a, b)
    assert math.isclose(got.mean, d.mean(), rel_tol=1e-12)
    assert math.isclose(got.ci95, 1.96 * d.std(ddof=1) / math.sqrt(400), rel_tol=1e-12)
    assert got.num_episodes == 400 and math.isclose(got.a_mean - got.b_mean, got.mean)
    # pairing removes the shared variance: far tighter than either method's own interval
    assert got.ci95 < 0.25 * mean_ci95(a)[1]
    assert got.significant and not paired_difference(b, b).significant
    assert got.to_dict()["difference"] == got.mean


def test_paired_difference_refuses_different_episode_counts():
    with pytest.raises(ValueError, match="same episodes"):
        paired_difference([0.1, 0.2, 0.3], [0.1, 0.2])


def test_ece_on_hand_made_probabilities():
    probs = np.array(
        [
            [0.88, 0.12],  # conf 0.88, predicts 0, label 0: correct   -> bin (13/15, 14/15]
            [0.08, 0.92],  # conf 0.92, predicts 1, label 0: wrong     -> bin (13/15, 14/15]
            [0.70, 0.30],  # conf 0.70, predicts 0, label 0: correct   -> bin (10/15, 11/15]
            [0.30, 0.70],  # conf 0.70, predicts 1, label 0: wrong     -> bin (10/15, 11/15]
            [0.45, 0.55],  # conf 0.55, predicts 1, label 1: correct   -> bin (8/15, 9/15]
        ]
    )
    labels = np.array([0, 0, 0, 0, 1])
    # bin 13: 2 predictions, accuracy 1/2, mean confidence 0.90 -> 2/5 * 0.40
    # bin 10: 2 predictions, accuracy 1/2, mean confidence 0.70 -> 2/5 * 0.20
    # bin  8: 1 prediction,  accuracy 1,   mean confidence 0.55 -> 1/5 * 0.45
    expected = 0.4 * 0.40 + 0.4 * 0.20 + 0.2 * 0.45
    assert math.isclose(expected_calibration_error(probs, labels), expected, rel_tol=1e-12)
    totals = CalibrationTotals().add_probabilities(probs, labels)
    assert totals.count.tolist() == [0] * 8 + [1, 0, 2, 0, 0, 2, 0]
    assert math.isclose(totals.accuracy, 0.6)


def test_ece_is_zero_when_confidence_equals_accuracy_in_every_bin():
    conf = np.array([0.7] * 10 + [0.95] * 20)
    correct = np.array([1] * 7 + [0] * 3 + [1] * 19 + [0])
    assert CalibrationTotals().add(conf, correct).ece == pytest.approx(0.0, abs=1e-12)


def _ece_by_loops(probs, labels, bins=15):
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for i in range(bins):
        inside = (conf > i / bins) & (conf <= (i + 1) / bins)
        if inside.any():
            acc = (pred[inside] == labels[inside]).mean()
            total += inside.sum() / len(conf) * abs(acc - conf[inside].mean())
    return total


def test_ece_totals_add_up_over_batches_and_match_a_loop_version():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, size=(1000, 5))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = rng.integers(0, 5, size=1000)
    whole = CalibrationTotals().add_probabilities(probs, labels)
    parts = CalibrationTotals().add_probabilities(probs[:300], labels[:300])
    parts.add_probabilities(torch.tensor(probs[300:]), torch.tensor(labels[300:]))
    assert np.array_equal(whole.count, parts.count) and whole.count.sum() == 1000
    assert math.isclose(whole.ece, parts.ece, rel_tol=1e-12)
    assert math.isclose(whole.ece, _ece_by_loops(probs, labels), rel_tol=1e-9)
    assert whole.ece > 0.01


def test_ece_refuses_nan_and_out_of_range_confidences():
    for bad in ([0.5, float("nan")], [0.5, 1.2]):
        with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
            CalibrationTotals().add(np.array(bad), np.array([1, 0]))
