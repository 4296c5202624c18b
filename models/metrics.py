"""Metrics without scikit-learn: ROC AUC, ROC curve, temperature scaling, operating points."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    ranks = np.empty(len(values), dtype=np.float64)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U); NaN when one class is absent."""
    y_true = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    pos, neg = int(y_true.sum()), int((~y_true).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _ranks(score)
    return float((ranks[y_true].sum() - pos * (pos + 1) / 2) / (pos * neg))


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), thresholds descending."""
    y_true = np.asarray(y_true).astype(bool)
    score = np.asarray(score, dtype=np.float64)
    thresholds = np.concatenate([[np.inf], np.unique(score)[::-1]])
    tpr = np.array([(score[y_true] >= t).mean() for t in thresholds])
    fpr = np.array([(score[~y_true] >= t).mean() for t in thresholds])
    return fpr, tpr, thresholds


def fit_temperature(y_true: np.ndarray, logits: np.ndarray) -> float:
    """Temperature T minimising the negative log-likelihood of sigmoid(logit / T)."""
    y = np.asarray(y_true, dtype=np.float64)
    z = np.asarray(logits, dtype=np.float64)

    def nll(t: float) -> float:
        s = z / t
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 400))
    best = grid[int(np.argmin([nll(t) for t in grid]))]
    fine = np.exp(np.linspace(np.log(best) - 0.02, np.log(best) + 0.02, 81))
    return float(fine[int(np.argmin([nll(t) for t in fine]))])


@dataclass(frozen=True)
class OperatingPoint:
    """Confusion matrix and rates at one threshold (score >= threshold means pneumonia)."""

    threshold: float
    tp: int
    fn: int
    tn: int
    fp: int

    @property
    def sensitivity(self) -> float:
        """True positive rate."""
        return self.tp / max(self.tp + self.fn, 1)

    @property
    def specificity(self) -> float:
        """True negative rate."""
        return self.tn / max(self.tn + self.fp, 1)

    @property
    def accuracy(self) -> float:
        """Fraction correct."""
        return (self.tp + self.tn) / max(self.tp + self.tn + self.fp + self.fn, 1)

    def as_dict(self) -> dict:
        """Plain dict for JSON reports."""
        return {
            "threshold": self.threshold,
            "sensitivity": round(self.sensitivity, 4),
            "specificity": round(self.specificity, 4),
            "accuracy": round(self.accuracy, 4),
            "confusion": {"tp": self.tp, "fn": self.fn, "tn": self.tn, "fp": self.fp},
        }


def operating_point(y_true: np.ndarray, score: np.ndarray, threshold: float) -> OperatingPoint:
    """Confusion counts at ``threshold``."""
    y = np.asarray(y_true).astype(bool)
    pred = np.asarray(score) >= threshold
    return OperatingPoint(
        threshold=float(threshold),
        tp=int(np.sum(pred & y)),
        fn=int(np.sum(~pred & y)),
        tn=int(np.sum(~pred & ~y)),
        fp=int(np.sum(pred & ~y)),
    )


def operating_thresholds(
    y_true: np.ndarray, prob: np.ndarray, sensitivity: float = 0.98, specificity: float = 0.95
) -> tuple[float, float]:
    """(screening, high-confidence) thresholds on ``prob``.

    Screening: the highest threshold whose sensitivity is still >= ``sensitivity``.
    High confidence: the lowest threshold whose specificity is >= ``specificity``.
    Each threshold is placed midway between neighbouring scores, not on a training score.
    """
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(prob, dtype=np.float64)
    pos = np.sort(p[y])
    neg = np.sort(p[~y])
    # allow at most k positives below the screening threshold
    k = int(np.floor((1 - sensitivity) * len(pos) + 1e-9))
    screening = (pos[k - 1] + pos[k]) / 2 if k > 0 else max(pos[0] - 1e-4, 0.0)
    # allow at most m negatives at or above the high-confidence threshold
    m = int(np.floor((1 - specificity) * len(neg) + 1e-9))
    idx = len(neg) - m  # first negative allowed above
    high = (neg[idx - 1] + neg[idx]) / 2 if m > 0 else min(neg[-1] + 1e-4, 1.0)
    return float(screening), float(high)
