"""melanoma.metrics against independent computations: brute-force AUC, a known temperature, synthetic
calibration, exhaustive threshold search and a hand-computed confusion matrix."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from melanoma import metrics


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def brute_force_auc(scores, positive) -> float:
    """P(score of a positive > score of a negative) + P(tie) / 2, over every pair."""
    pos, neg = scores[positive], scores[~positive]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# ---------------------------------------------------------------- AUC


@pytest.mark.parametrize("seed", range(6))
def test_roc_auc_equals_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    positive = rng.random(n) < rng.uniform(0.2, 0.8)
    positive[0], positive[1] = True, False
    scores = rng.integers(0, 6, size=n) / 5.0 + positive * rng.uniform(0, 0.4)  # coarse: many ties
    scores = np.round(scores, 1)

    assert metrics.roc_auc(scores, positive) == pytest.approx(brute_force_auc(scores, positive), abs=1e-12)


def test_roc_auc_extremes_and_all_tied():
    positive = np.array([True, True, False, False, False])
    assert metrics.roc_auc(np.array([0.9, 0.8, 0.1, 0.2, 0.3]), positive) == 1.0
    assert metrics.roc_auc(np.array([0.1, 0.2, 0.9, 0.8, 0.7]), positive) == 0.0
    assert metrics.roc_auc(np.full(5, 0.5), positive) == 0.5


def test_roc_auc_is_none_when_a_class_is_absent():
    scores = np.array([0.1, 0.5, 0.9])
    assert metrics.roc_auc(scores, np.array([True, True, True])) is None
    assert metrics.roc_auc(scores, np.array([False, False, False])) is None


def test_roc_curve_runs_from_origin_to_one_one_and_its_area_is_the_auc():
    rng = np.random.default_rng(3)
    positive = rng.random(200) < 0.3
    scores = rng.random(200) + positive * 0.3
    fpr, tpr = metrics.roc_curve(scores, positive)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(metrics.roc_auc(scores, positive), abs=1e-9)


# ---------------------------------------------------------------- temperature and calibration


def test_fit_temperature_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    n, k, t0 = 5000, 9, 2.5
    logits = rng.normal(0, 3.0, size=(n, k))
    true_probs = softmax(logits / t0)
    labels = np.array([rng.choice(k, p=p) for p in true_probs])

    fitted = metrics.fit_temperature(softmax(logits), labels)

    assert fitted == pytest.approx(t0, rel=0.15)
    # ... and the fitted temperature calibrates: its NLL beats the raw probabilities'
    probs = softmax(logits)
    assert metrics.nll(metrics.temperature_scale(probs, fitted), labels) < metrics.nll(probs, labels) - 0.1


def test_temperature_scale_with_t_1_is_the_identity_and_keeps_the_argmax():
    probs = softmax(np.random.default_rng(1).normal(size=(50, 9)))
    np.testing.assert_allclose(metrics.temperature_scale(probs, 1.0), probs, atol=1e-9)
    hot = metrics.temperature_scale(probs, 3.0)
    np.testing.assert_allclose(hot.sum(axis=1), 1.0)
    assert (hot.argmax(axis=1) == probs.argmax(axis=1)).all()
    assert (hot.max(axis=1) < probs.max(axis=1)).all()


def test_ece_is_near_zero_when_calibrated_and_large_when_overconfident():
    rng = np.random.default_rng(4)
    risk = rng.random(20000)
    positive = rng.random(20000) < risk  # P(positive | risk) = risk: calibrated by construction
    assert metrics.expected_calibration_error(risk, positive) < 0.02

    truth = rng.random(20000) < 0.7  # really 70% positive ...
    said = np.where(rng.random(20000) < 0.5, 0.99, 0.01)  # ... told 99% or 1% at random
    ece = metrics.expected_calibration_error(said, truth)
    assert ece == pytest.approx(0.5 * abs(0.7 - 0.99) + 0.5 * abs(0.7 - 0.01), abs=0.02)
    assert ece > 0.4


def test_ece_of_a_single_bin_is_the_gap_between_rate_and_mean_risk():
    risk = np.array([0.61, 0.62, 0.63, 0.64])
    positive = np.array([True, False, False, False])
    assert metrics.expected_calibration_error(risk, positive) == pytest.approx(0.625 - 0.25)


# ---------------------------------------------------------------- alert threshold


def highest_threshold_brute_force(risk, positive, target) -> float:
    """The largest candidate t with (#positives with risk >= t) / #positives >= target, in exact decimal
    arithmetic: a target of 0.55 means 55 of 100 positives."""
    pos = risk[positive]
    goal = Fraction(repr(target))
    ok = [t for t in np.unique(risk) if Fraction(int((pos >= t).sum()), len(pos)) >= goal]
    return float(max(ok))


@pytest.mark.parametrize(
    "n_pos, target",
    [(10, 0.9), (37, 0.9), (100, 0.9), (70, 0.95), (9, 0.5), (1, 0.9), (100, 0.55), (25, 0.28), (50, 0.56)],
)
def test_threshold_for_sensitivity_reaches_the_target_and_is_the_highest_such(n_pos, target):
    rng = np.random.default_rng(n_pos)
    positive = np.zeros(n_pos + 40, dtype=bool)
    positive[:n_pos] = True
    risk = np.round(rng.random(len(positive)), 3)

    threshold = metrics.threshold_for_sensitivity(risk, positive, target)

    caught = int((risk[positive] >= threshold).sum())
    assert caught / n_pos >= target
    assert threshold == highest_threshold_brute_force(risk, positive, target), (
        f"{n_pos} positives, target {target}: threshold {threshold} catches {caught}; "
        f"{math.ceil(Fraction(repr(target)) * n_pos)} suffice"
    )


def test_threshold_for_sensitivity_without_positives_raises():
    with pytest.raises(metrics.MetricsError, match="no positive examples"):
        metrics.threshold_for_sensitivity(np.array([0.2, 0.4]), np.array([False, False]), 0.9)


# ---------------------------------------------------------------- classification report


def test_classification_report_on_a_hand_computed_confusion_matrix():
    names = ["nevus", "melanoma", "dermatofibroma"]
    # true label -> predicted: nevus 3 right, 1 as melanoma; melanoma 2 right, 1 as nevus; dermatofibroma 1 as melanoma
    pairs = [(0, 0), (0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 0), (2, 1)]
    labels = np.array([t for t, _ in pairs])
    probs = np.full((len(pairs), 3), 0.1)
    for row, (_, p) in enumerate(pairs):
        probs[row, p] = 0.8
    probs[:, 1] += np.linspace(0, 0.05, len(pairs))  # melanoma scores for the AUC, argmax unchanged

    report = metrics.classification_report(probs, labels, names, "melanoma")

    assert report["n"] == 8
    assert report["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [0, 1, 0]]
    assert report["accuracy"] == pytest.approx(5 / 8)
    assert report["balanced_accuracy"] == pytest.approx((3 / 4 + 2 / 3 + 0) / 3)
    assert report["per_class"]["nevus"] == {"support": 4, "recall": pytest.approx(3 / 4), "precision": pytest.approx(3 / 4)}
    assert report["per_class"]["melanoma"] == {"support": 3, "recall": pytest.approx(2 / 3), "precision": pytest.approx(2 / 4)}
    assert report["per_class"]["dermatofibroma"] == {"support": 1, "recall": 0.0, "precision": None}  # never predicted
    assert report["melanoma_auc"] == pytest.approx(brute_force_auc(probs[:, 1], labels == 1))


def test_classification_report_skips_absent_classes_in_balanced_accuracy():
    names = ["nevus", "melanoma", "dermatofibroma"]
    labels = np.array([0, 0, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0]])
    report = metrics.classification_report(probs, labels, names, "melanoma")
    assert report["per_class"]["dermatofibroma"] == {"support": 0, "recall": None, "precision": None}
    assert report["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)


# ---------------------------------------------------------------- calibrate


def synthetic_predictions(n: int, seed: int, t0: float = 2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3.0, size=(n, 9))
    labels = np.array([rng.choice(9, p=p) for p in softmax(logits / t0)])
    return softmax(logits), labels


def test_calibrate_reports_in_sample_and_held_out_figures():
    probs, labels = synthetic_predictions(3000, seed=5)
    result = metrics.calibrate(probs, labels, positive_index=3, target_sensitivity=0.9, seed=0)

    assert result["temperature"] == pytest.approx(metrics.fit_temperature(probs, labels))
    assert result["temperature"] == pytest.approx(2.0, rel=0.2)
    assert result["ece_after"] < result["ece_before"]
    assert result["at_threshold"]["sensitivity"] >= 0.9
    held = result["held_out"]
    assert set(held) == {"sensitivity", "specificity", "ece"}
    assert all(isinstance(v, float) and 0 <= v <= 1 for v in held.values())
    assert held["sensitivity"] == pytest.approx(0.9, abs=0.08)  # honest: near the target, not fitted to it
    assert held["ece"] < result["ece_before"]
    # seeded halves: same seed, same figures; another seed, other halves
    assert metrics.calibrate(probs, labels, 3, 0.9, seed=0)["held_out"] == held
    assert metrics.calibrate(probs, labels, 3, 0.9, seed=1)["held_out"] != held


def test_calibrate_held_out_is_none_when_a_half_has_no_positive():
    probs, labels = synthetic_predictions(400, seed=6)
    labels[labels == 3] = 0
    labels[0] = 3  # one melanoma: one half of the split has none
    result = metrics.calibrate(probs, labels, positive_index=3, target_sensitivity=0.9, seed=0)
    assert result["held_out"] == {"sensitivity": None, "specificity": None, "ece": None}
    assert result["alert_threshold"] == pytest.approx(metrics.temperature_scale(probs, result["temperature"])[0, 3])


def test_an_image_known_only_as_not_melanoma_counts_against_the_melanoma_probability():
    probs = np.array([[0.2, 0.8], [0.9, 0.1]])
    # label -1: known only as not class 1, so its likelihood is 1 - p[1]
    assert metrics.nll(probs, np.array([-1, 0]), positive_index=1) == pytest.approx(-np.mean(np.log([0.2, 0.9])))
    report = metrics.classification_report(probs, np.array([-1, 0]), ["benign", "melanoma"], "melanoma")
    assert report["n"] == 1 and report["accuracy"] == 1.0
    assert report["melanoma_auc"] is None  # no melanoma among the rows


def test_shipped_report_uses_the_shipped_threshold_and_supported_classes():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 20 + [0] * 60 + [2] * 3)
    probs = rng.dirichlet([1, 1, 1], size=len(labels))
    probs[labels == 1, 1] += 2
    probs /= probs.sum(axis=1, keepdims=True)
    report = metrics.shipped_report(probs, labels, 1.0, 0.5, 1, ["nevus", "melanoma", "other"], min_support=12)
    risk = probs[:, 1]
    assert report["sensitivity"] == pytest.approx((risk[labels == 1] >= 0.5).mean())
    assert report["supported_classes"] == ["nevus", "melanoma"]
    low, high = report["melanoma_auc_95"]
    assert low <= report["melanoma_auc"] <= high
