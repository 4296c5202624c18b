"""Site calibration: operating thresholds from a small local labelled sample, with bootstrap CIs.

Pure functions on arrays (labels 0/1, served probabilities, raw logits); nothing here touches
files, the model or the database.

The rule (also in ``models/shipped/MODEL_CARD.md``):

* **Screening threshold** (target sensitivity, default 0.98), errs toward sensitivity twice.
  (1) Draw ``B`` stratified bootstrap resamples of the sample (positives and negatives
  resampled separately); in each, take the highest threshold whose sensitivity is still >=
  the target (:func:`models.metrics.operating_thresholds`); take the ``margin_quantile``
  (default 10 %) **low** quantile of those thresholds (never above the whole-sample fit).
  (2) 60 positives cannot show the 2 % tail of a site's pneumonia scores, so where the classes
  separate well the threshold is lowered further, into the gap, down to where the sample's
  specificity is still >= ``screening_specificity_floor`` (default 0.90; the high 90 %
  quantile of the resampled thresholds at that specificity). The screening threshold is the
  lower of (1) and (2): the specificity the sample can spare is spent on sensitivity. The cost
  is specificity at screening, near 0.90-0.95 on a site where the classes separate (where the
  sample alone would have given 0.98), reported with its CI.
* **High-confidence threshold** (target specificity, default 0.95), errs toward specificity:
  the ``1 - margin_quantile`` high quantile of the resampled thresholds at the target
  specificity (never below the whole-sample fit), and never below threshold (1) above: where
  the classes separate, it sits at the lower edge of the positives, not at the upper edge of
  the negatives.
* **Confidence intervals**: for each fitted threshold, the 2.5 and 97.5 % percentiles of
  sensitivity and specificity over fresh stratified resamples at that fixed threshold, plus the
  exact (Clopper-Pearson) 95 % bounds, which stay honest where the bootstrap collapses (every
  positive above the threshold gives a bootstrap CI of [1, 1]).
* **Too small**: fewer than :data:`MIN_POSITIVES` positives or :data:`MIN_NEGATIVES` negatives
  is refused unless forced; the report also says how many positives would be needed for the
  exact lower bound to reach the target sensitivity at all.
* **Temperature**: the site's negative-log-likelihood temperature is fitted and reported, but
  not applied: it is a monotone rescaling, so it moves neither the ranking nor the tiers, and
  stored scores stay comparable across calibrations. Thresholds are on the served probability.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from models.metrics import fit_temperature, operating_point, operating_thresholds, roc_auc

MIN_POSITIVES = 50
MIN_NEGATIVES = 30
DEFAULT_TARGET_SENSITIVITY = 0.98
DEFAULT_TARGET_SPECIFICITY = 0.95
DEFAULT_BOOTSTRAP = 2000
DEFAULT_MARGIN_QUANTILE = 0.10
DEFAULT_SCREENING_SPECIFICITY_FLOOR = 0.90
DEFAULT_SEED = 20261123


@dataclass(frozen=True)
class ThresholdRule:
    """The parameters of the threshold rule in the module docstring."""

    target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY
    target_specificity: float = DEFAULT_TARGET_SPECIFICITY
    draws: int = DEFAULT_BOOTSTRAP  # bootstrap resamples
    margin_quantile: float = DEFAULT_MARGIN_QUANTILE
    seed: int = DEFAULT_SEED
    screening_specificity_floor: float = DEFAULT_SCREENING_SPECIFICITY_FLOOR


@dataclass(frozen=True)
class Interval:
    """A point estimate with a 95 % bootstrap interval and the exact (Clopper-Pearson) interval."""

    value: float
    low: float
    high: float
    exact_low: float | None = None
    exact_high: float | None = None

    def as_dict(self) -> dict:
        return {k: (None if v is None else round(float(v), 4)) for k, v in asdict(self).items()}

    def text(self) -> str:
        exact = "" if self.exact_low is None else f"; exact {self.exact_low:.3f}-{self.exact_high:.3f}"
        return f"{self.value:.3f} (95 % CI {self.low:.3f}-{self.high:.3f}{exact})"


@dataclass(frozen=True)
class PointEstimate:
    """Sensitivity and specificity to expect at one threshold, with CIs and counts."""

    threshold: float
    sensitivity: Interval
    specificity: Interval
    tp: int
    fn: int
    tn: int
    fp: int

    def as_dict(self) -> dict:
        return {
            "threshold": round(self.threshold, 6),
            "sensitivity": self.sensitivity.as_dict(),
            "specificity": self.specificity.as_dict(),
            "confusion": {"tp": self.tp, "fn": self.fn, "tn": self.tn, "fp": self.fp},
        }


@dataclass
class CalibrationFit:
    """Everything one calibration produced; ``details()`` is what the database keeps as JSON."""

    screening_threshold: float
    high_confidence_threshold: float
    screening: PointEstimate
    high_confidence: PointEstimate
    sample_size: int
    positives: int
    target_sensitivity: float
    target_specificity: float
    auc: Interval
    site_temperature: float | None
    served_temperature: float | None
    bootstrap: int
    margin_quantile: float
    screening_specificity_floor: float = DEFAULT_SCREENING_SPECIFICITY_FLOOR
    warnings: list[str] = field(default_factory=list)

    @property
    def negatives(self) -> int:
        return self.sample_size - self.positives

    @property
    def too_small(self) -> bool:
        return self.positives < MIN_POSITIVES or self.negatives < MIN_NEGATIVES

    def details(self) -> dict:
        """JSON-ready record of the fit (CIs, rule, warnings)."""
        return {
            "rule": "stratified bootstrap; screening = lower of (low quantile of resampled thresholds at "
            "target sensitivity, high quantile at the screening specificity floor); high confidence = "
            "higher of (high quantile at target specificity, the former)",
            "bootstrap": self.bootstrap,
            "margin_quantile": self.margin_quantile,
            "screening_specificity_floor": self.screening_specificity_floor,
            "negatives": self.negatives,
            "auc": self.auc.as_dict(),
            "screening": self.screening.as_dict(),
            "high_confidence": self.high_confidence.as_dict(),
            "site_temperature": None if self.site_temperature is None else round(self.site_temperature, 4),
            "served_temperature": self.served_temperature,
            "positives_needed_for_target": positives_needed(self.target_sensitivity),
            "warnings": self.warnings,
        }

    def text(self) -> str:
        """Human-readable summary."""
        lines = [
            f"sample: {self.sample_size} films ({self.positives} pneumonia, {self.negatives} normal); "
            f"ROC AUC {self.auc.text()}",
            f"screening threshold {self.screening_threshold:.4f} (target sensitivity "
            f"{self.target_sensitivity:.2f}): sensitivity {self.screening.sensitivity.text()}, "
            f"specificity {self.screening.specificity.text()}",
            f"high-confidence threshold {self.high_confidence_threshold:.4f} (target specificity "
            f"{self.target_specificity:.2f}): sensitivity {self.high_confidence.sensitivity.text()}, "
            f"specificity {self.high_confidence.specificity.text()}",
        ]
        if self.site_temperature is not None:
            lines.append(
                f"site temperature {self.site_temperature:.3f} (served {self.served_temperature}): "
                "reported only; it does not change ranking or tiers"
            )
        return "\n".join(lines + [f"WARNING: {w}" for w in self.warnings])


def clopper_pearson(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval (beta quantiles by bisection; no SciPy needed)."""
    if trials <= 0:
        return float("nan"), float("nan")
    alpha = (1 - level) / 2
    low = 0.0 if successes == 0 else _binomial_bound(successes, trials, alpha, upper=False)
    high = 1.0 if successes == trials else _binomial_bound(successes, trials, alpha, upper=True)
    return low, high


def _binomial_tail(k: int, n: int, p: float, upper: bool) -> float:
    """P(X >= k) (upper) or P(X <= k) for X ~ Binomial(n, p)."""
    ks = range(k, n + 1) if upper else range(0, k + 1)
    return float(sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in ks))


def _binomial_bound(k: int, n: int, alpha: float, upper: bool) -> float:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if upper:  # largest p with P(X <= k) >= alpha
            lo, hi = (mid, hi) if _binomial_tail(k, n, mid, upper=False) > alpha else (lo, mid)
        else:  # smallest p with P(X >= k) >= alpha
            lo, hi = (lo, mid) if _binomial_tail(k, n, mid, upper=True) > alpha else (mid, hi)
    return (lo + hi) / 2


def positives_needed(target: float, level: float = 0.95) -> int:
    """Positives needed (none missed) before the exact lower bound of sensitivity reaches ``target``."""
    alpha = (1 - level) / 2
    return int(math.ceil(math.log(alpha) / math.log(target)))


def _stratified_indices(y: np.ndarray, rng: np.random.Generator, draws: int) -> np.ndarray:
    """(draws, n) index arrays resampling positives and negatives separately (class sizes kept)."""
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    parts = [
        group[rng.integers(0, len(group), size=(draws, len(group)))] for group in (pos, neg) if len(group)
    ]
    return np.concatenate(parts, axis=1)


def _check(y_true: np.ndarray, prob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(prob, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError("labels and scores must be 1-D arrays of the same length")
    if y.sum() < 2 or (~y).sum() < 2:
        raise ValueError("need at least 2 pneumonia and 2 normal films to fit thresholds")
    return y, p


def estimate_at(
    y_true: np.ndarray, prob: np.ndarray, threshold: float, draws: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> PointEstimate:
    """Sensitivity and specificity at a fixed ``threshold`` with bootstrap and exact 95 % CIs."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(prob, dtype=np.float64)
    point = operating_point(y, p, threshold)
    idx = _stratified_indices(y, np.random.default_rng(seed), draws)
    flagged, positive = p[idx] >= threshold, y[idx]
    sens = (flagged & positive).sum(1) / np.maximum(positive.sum(1), 1)
    spec = (~flagged & ~positive).sum(1) / np.maximum((~positive).sum(1), 1)

    def interval(value: float, samples: np.ndarray, k: int, n: int) -> Interval:
        low, high = np.percentile(samples, [2.5, 97.5])
        exact = clopper_pearson(k, n)
        return Interval(value, float(low), float(high), exact[0], exact[1])

    return PointEstimate(
        threshold=float(threshold),
        sensitivity=interval(point.sensitivity, sens, point.tp, point.tp + point.fn),
        specificity=interval(point.specificity, spec, point.tn, point.tn + point.fp),
        tp=point.tp,
        fn=point.fn,
        tn=point.tn,
        fp=point.fp,
    )


def auc_interval(
    y_true: np.ndarray, prob: np.ndarray, draws: int = DEFAULT_BOOTSTRAP, seed: int = 0
) -> Interval:
    """ROC AUC with a stratified bootstrap 95 % percentile interval."""
    y = np.asarray(y_true).astype(bool)
    p = np.asarray(prob, dtype=np.float64)
    idx = _stratified_indices(y, np.random.default_rng(seed), draws)
    values = np.array([roc_auc(y[row], p[row]) for row in idx])
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return Interval(roc_auc(y, p), float(low), float(high))


def fit_thresholds(
    y_true: np.ndarray,
    prob: np.ndarray,
    rule: ThresholdRule = ThresholdRule(),  # noqa: B008 - frozen, so one shared default is safe
) -> tuple[float, float]:
    """(screening, high-confidence) thresholds by the module's rule (see the module docstring)."""
    y, p = _check(y_true, prob)
    sens, spec, margin = rule.target_sensitivity, rule.target_specificity, rule.margin_quantile
    whole_sens, whole_spec = operating_thresholds(y, p, sens, spec)
    idx = _stratified_indices(y, np.random.default_rng(rule.seed), rule.draws)
    resampled = np.array(
        [
            (
                *operating_thresholds(y[row], p[row], sens, spec),
                operating_thresholds(y[row], p[row], sens, rule.screening_specificity_floor)[1],
            )
            for row in idx
        ]
    )
    at_sensitivity = min(float(np.quantile(resampled[:, 0], margin)), whole_sens)
    at_floor = float(np.quantile(resampled[:, 2], 1 - margin))
    screening = min(at_sensitivity, at_floor)
    at_specificity = max(float(np.quantile(resampled[:, 1], 1 - margin)), whole_spec)
    high = max(at_specificity, at_sensitivity, screening)
    return screening, high


def calibrate(
    y_true: np.ndarray,
    prob: np.ndarray,
    logits: np.ndarray | None = None,
    served_temperature: float | None = None,
    rule: ThresholdRule = ThresholdRule(),  # noqa: B008 - frozen, so one shared default is safe
) -> CalibrationFit:
    """Fit both thresholds, their CIs, the AUC CI and (with logits) the site temperature."""
    if not (0.5 <= rule.target_sensitivity < 1 and 0.5 <= rule.target_specificity < 1):
        raise ValueError("targets must be in [0.5, 1)")
    y, p = _check(y_true, prob)
    screening, high = fit_thresholds(y, p, rule)
    draws, seed = rule.draws, rule.seed
    fit = CalibrationFit(
        screening_threshold=screening,
        high_confidence_threshold=high,
        screening=estimate_at(y, p, screening, draws, seed + 1),
        high_confidence=estimate_at(y, p, high, draws, seed + 2),
        sample_size=int(len(y)),
        positives=int(y.sum()),
        target_sensitivity=rule.target_sensitivity,
        target_specificity=rule.target_specificity,
        auc=auc_interval(y, p, min(draws, 500), seed + 3),
        site_temperature=None if logits is None else fit_temperature(y, np.asarray(logits, dtype=np.float64)),
        served_temperature=served_temperature,
        bootstrap=draws,
        margin_quantile=rule.margin_quantile,
        screening_specificity_floor=rule.screening_specificity_floor,
    )
    fit.warnings.extend(sample_warnings(fit))
    return fit


def sample_warnings(fit: CalibrationFit) -> list[str]:
    """Plain statements of what this sample cannot support."""
    notes = []
    if fit.too_small:
        notes.append(
            f"sample too small: {fit.positives} pneumonia and {fit.negatives} normal films; at least "
            f"{MIN_POSITIVES} and {MIN_NEGATIVES} are needed before thresholds are worth storing"
        )
    needed = positives_needed(fit.target_sensitivity)
    if fit.positives < needed:
        notes.append(
            f"{fit.positives} pneumonia films cannot show sensitivity >= {fit.target_sensitivity:.2f}: even "
            f"with none missed the exact 95 % lower bound is "
            f"{clopper_pearson(fit.positives, fit.positives)[0]:.3f}; that needs >= {needed} positives"
        )
    if fit.screening.sensitivity.low < fit.target_sensitivity:
        notes.append(
            f"at the screening threshold the lower 95 % bound of sensitivity "
            f"({fit.screening.sensitivity.low:.3f}) is below the target {fit.target_sensitivity:.2f}"
        )
    if fit.high_confidence.specificity.low < fit.target_specificity:
        notes.append(
            f"at the high-confidence threshold the lower 95 % bound of specificity "
            f"({fit.high_confidence.specificity.low:.3f}) is below the target {fit.target_specificity:.2f}"
        )
    return notes


def labels_from_reviews(decisions: list[tuple[str, float, float]]) -> np.ndarray:
    """Labels from reader reviews: (decision, score, screening threshold) per reviewed film.

    An ``agree`` keeps the model's call (pneumonia when the score was at or above the screening
    threshold in force), a ``disagree`` flips it.
    """
    out = []
    for decision, score, threshold in decisions:
        call = score >= threshold
        if decision == "agree":
            out.append(int(call))
        elif decision == "disagree":
            out.append(int(not call))
        else:
            raise ValueError(f"unknown review decision {decision!r}")
    return np.array(out, dtype=np.int64)
