"""Evaluation and calibration on held-out predictions: plain numpy, no Keras, no Ray."""

from __future__ import annotations

import math

import numpy as np

from melanoma.errors import MelanomaError


class MetricsError(MelanomaError):
    """Why held-out predictions cannot be evaluated or calibrated, in one line."""


def temperature_scale(probs: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the class probabilities of a model whose logits were divided by T."""
    logits = np.log(np.clip(probs, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    e = np.exp(logits)
    return e / e.sum(axis=1, keepdims=True)


def nll(probs: np.ndarray, labels: np.ndarray, positive_index: int | None = None) -> float:
    """Mean negative log-likelihood of the labels; a label of -1 (known only as not `positive_index`) counts
    as -log(1 - p[positive_index])."""
    p = probs[np.arange(len(labels)), np.maximum(labels, 0)]
    if positive_index is not None:
        p = np.where(labels >= 0, p, 1.0 - probs[:, positive_index])
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit_temperature(probs: np.ndarray, labels: np.ndarray, positive_index: int | None = None) -> float:
    """The T in [0.05, 20] minimising the negative log-likelihood (golden-section search on log T)."""
    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    for _ in range(60):
        if nll(temperature_scale(probs, math.exp(a)), labels, positive_index) < nll(temperature_scale(probs, math.exp(b)), labels, positive_index):
            hi = b
        else:
            lo = a
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    return float(math.exp((lo + hi) / 2))


def expected_calibration_error(risk: np.ndarray, positive: np.ndarray, bins: int = 15) -> float:
    """ECE of a binary risk: mean |observed rate - mean risk| over equal-width bins, weighted by bin size."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(risk, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            total += mask.sum() * abs(positive[mask].mean() - risk[mask].mean())
    return float(total / len(risk))


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Mann-Whitney AUC with ties counted half; None when a class is absent."""
    pos, neg = scores[positive], scores[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return None
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    ranks = np.empty(len(order))
    ranks[order] = np.arange(1, len(order) + 1)
    values = np.concatenate([pos, neg])
    for v in np.unique(values):  # average ranks of ties
        tied = values == v
        ranks[tied] = ranks[tied].mean()
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc_curve(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0,0) to (1,1)."""
    thresholds = np.unique(scores)[::-1]
    tpr = [0.0] + [float((scores[positive] >= t).mean()) for t in thresholds]
    fpr = [0.0] + [float((scores[~positive] >= t).mean()) for t in thresholds]
    return np.array(fpr), np.array(tpr)


def threshold_for_sensitivity(risk: np.ndarray, positive: np.ndarray, target: float) -> float:
    """The highest threshold at which risk >= threshold catches at least `target` of the positives."""
    pos = np.sort(risk[positive])[::-1]
    if len(pos) == 0:
        raise MetricsError("no positive examples to set an alert threshold on")
    k = max(int(math.ceil(round(target * len(pos), 9))), 1)  # round: 0.55 * 100 is 55.00000000000001
    return float(pos[k - 1])


def classification_report(probs: np.ndarray, labels: np.ndarray, class_names: list[str], positive_class: str) -> dict:
    """Accuracy, balanced accuracy, per-class recall/precision, confusion matrix over the rows with a class;
    positive-vs-rest AUC over every row (a label of -1 is an image known only as not positive)."""
    pos = class_names.index(positive_class)
    auc = roc_auc(probs[:, pos], labels == pos)
    probs, labels = probs[labels >= 0], labels[labels >= 0]
    k = len(class_names)
    predicted = probs.argmax(axis=1)
    confusion = np.zeros((k, k), dtype=int)
    np.add.at(confusion, (labels, predicted), 1)
    support = confusion.sum(axis=1)
    recall = np.divide(np.diag(confusion), support, out=np.full(k, np.nan), where=support > 0)
    called = confusion.sum(axis=0)
    precision = np.divide(np.diag(confusion), called, out=np.full(k, np.nan), where=called > 0)
    return {
        "n": int(len(labels)),
        "accuracy": float((predicted == labels).mean()),
        "balanced_accuracy": float(np.nanmean(recall)),
        "per_class": {
            name: {
                "support": int(support[i]),
                "recall": None if np.isnan(recall[i]) else float(recall[i]),
                "precision": None if np.isnan(precision[i]) else float(precision[i]),
            }
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion.tolist(),
        "melanoma_auc": auc,
    }


def alert_report(risk: np.ndarray, positive: np.ndarray, threshold: float) -> dict:
    flagged = risk >= threshold
    return {
        "threshold": float(threshold),
        "sensitivity": float(flagged[positive].mean()) if positive.any() else None,
        "specificity": float((~flagged[~positive]).mean()) if (~positive).any() else None,
        "flagged_fraction": float(flagged.mean()),
    }


def calibrate(probs: np.ndarray, labels: np.ndarray, positive_index: int, target_sensitivity: float, seed: int) -> dict:
    """Temperature and alert threshold fitted on all of `probs`, plus honest figures for both: each is
    also fitted on one half (stratified by label) and measured on the other, both ways round."""
    positive = labels == positive_index
    temperature = fit_temperature(probs, labels, positive_index)
    calibrated = temperature_scale(probs, temperature)[:, positive_index]
    threshold = threshold_for_sensitivity(calibrated, positive, target_sensitivity)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        half[members[: len(members) // 2]] = True
    held_out = []
    for fit_on in (half, ~half):
        t = fit_temperature(probs[fit_on], labels[fit_on], positive_index)
        risk_fit = temperature_scale(probs[fit_on], t)[:, positive_index]
        if not positive[fit_on].any() or not positive[~fit_on].any():
            continue
        th = threshold_for_sensitivity(risk_fit, positive[fit_on], target_sensitivity)
        risk_eval = temperature_scale(probs[~fit_on], t)[:, positive_index]
        held_out.append(alert_report(risk_eval, positive[~fit_on], th) | {
            "ece": expected_calibration_error(risk_eval, positive[~fit_on]),
        })
    return {
        "temperature": temperature,
        "alert_threshold": threshold,
        "target_sensitivity": target_sensitivity,
        "ece_before": expected_calibration_error(probs[:, positive_index], positive),
        "ece_after": expected_calibration_error(calibrated, positive),
        "at_threshold": alert_report(calibrated, positive, threshold),
        "held_out": {
            key: float(np.mean([h[key] for h in held_out])) if held_out else None
            for key in ("sensitivity", "specificity", "ece")
        },
    }


def shipped_report(probs: np.ndarray, labels: np.ndarray, temperature: float, threshold: float, positive_index: int,
                   class_names: list[str], min_support: int = 12, draws: int = 1000) -> dict:
    """A model as shipped (its temperature and alert threshold, nothing refitted) on a test set: melanoma AUC
    with a 95% bootstrap interval, sensitivity and specificity at the threshold, ECE, and the balanced accuracy
    over the classes with at least `min_support` images (a class of 1-2 images moves the mean by 1/k alone)."""
    calibrated = temperature_scale(probs, temperature)
    risk, positive = calibrated[:, positive_index], labels == positive_index
    report = classification_report(calibrated, labels, class_names, class_names[positive_index])
    rng = np.random.default_rng(0)
    aucs = [roc_auc(risk[d], positive[d]) for d in (rng.integers(0, len(labels), len(labels)) for _ in range(draws))]
    aucs = [a for a in aucs if a is not None]  # a draw without a melanoma has no AUC
    supported = [c["recall"] for c in report["per_class"].values() if c["support"] >= min_support]
    return {
        "n": int(len(labels)),
        "melanomas": int(positive.sum()),
        "melanoma_auc": report["melanoma_auc"],
        "melanoma_auc_95": [float(np.percentile(aucs, 2.5)), float(np.percentile(aucs, 97.5))] if aucs else None,
        "ece": expected_calibration_error(risk, positive),
        "balanced_accuracy_supported": float(np.mean(supported)) if supported else None,
        "supported_classes": [n for n, c in report["per_class"].items() if c["support"] >= min_support],
        "recall": {n: [c["recall"], c["support"]] for n, c in report["per_class"].items() if c["support"]},
        **alert_report(risk, positive, threshold),
    }
