"""Statistics of the quality report: pure functions of numbers (numpy only; SciPy is not a dependency).

* :func:`wilson`: a proportion with its Wilson score 95 % interval (good at small counts and at 0 or
  1, where the normal approximation gives intervals outside [0, 1]).
* :func:`psi`: the population stability index of a sample against a reference, on bins cut at the
  reference's quantiles.
* :func:`ks_2samp`: the two-sample Kolmogorov-Smirnov statistic and its asymptotic p-value.
* :class:`DriftRule`: the verdict ``drifted`` / ``stable`` / ``insufficient`` from both.

Why both, and why this rule: PSI measures how much the distribution moved, but by chance alone two
samples of one distribution give a PSI of about ``(bins - 1) * (1/n + 1/m)`` -- 0.15 for 150 films
against a 100-film calibration sample on 10 bins, and above the usual 0.25 "significant shift"
line about one time in five. The KS test answers "is this more than chance?" at the sample sizes
at hand but says little about how large the shift is (with thousands of films a negligible shift is
significant). So a site is *drifted* when both hold: KS p < 0.01 (significance) and PSI > 0.10
(size: the industry's "some shift" line), with at least 30 recent films and 30 reference films.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

#: z for a two-sided 95 % interval.
Z95 = 1.959963984540054


@dataclass(frozen=True)
class Proportion:
    """``k`` of ``n`` with its Wilson 95 % interval (all None where ``n`` is 0)."""

    k: int
    n: int
    estimate: float | None
    low: float | None
    high: float | None

    def as_dict(self) -> dict:
        return asdict(self)


def wilson(k: int, n: int, z: float = Z95) -> Proportion:
    """The share ``k / n`` with its Wilson score interval."""
    if not 0 <= k <= n:
        raise ValueError("need 0 <= k <= n")
    if n == 0:
        return Proportion(0, 0, None, None, None)
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return Proportion(k, n, p, max(0.0, centre - half), min(1.0, centre + half))


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties merged: fewer bins where values repeat)."""
    inner = np.quantile(np.asarray(reference, dtype=float), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(inner)


def psi(reference, sample, bins: int = 10, pseudo_count: float = 0.5) -> float:
    """Population stability index ``sum((s - r) * ln(s / r))`` over bins cut at the reference's
    quantiles; ``pseudo_count`` per bin keeps an empty bin finite. Invariant to any increasing
    transform of the scores (probability, logit), since the bins follow the reference."""
    reference = np.asarray(reference, dtype=float)
    sample = np.asarray(sample, dtype=float)
    if reference.size == 0 or sample.size == 0:
        raise ValueError("both samples need at least one value")
    edges = quantile_edges(reference, bins)
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=edges.size + 1) + pseudo_count
    s = np.bincount(np.searchsorted(edges, sample, side="right"), minlength=edges.size + 1) + pseudo_count
    r, s = r / r.sum(), s / s.sum()
    return float(np.sum((s - r) * np.log(s / r)))


def kolmogorov_sf(x: float, terms: int = 100) -> float:
    """P(K > x) for the Kolmogorov distribution: ``2 * sum((-1)^(j-1) exp(-2 j^2 x^2))``."""
    if x <= 0.0:
        return 1.0
    if x < 0.2:  # the series converges slowly here, and the value is 1 to double precision
        return 1.0
    j = np.arange(1, terms + 1)
    value = 2.0 * np.sum((-1.0) ** (j - 1) * np.exp(-2.0 * j * j * x * x))
    return float(min(1.0, max(0.0, value)))


def ks_2samp(a, b) -> tuple[float, float]:
    """(D, p): the largest gap between the two empirical distribution functions, and its asymptotic
    p-value with Stephens' small-sample correction ``(sqrt(ne) + 0.12 + 0.11 / sqrt(ne)) * D``,
    ``ne = n m / (n + m)`` (Numerical Recipes 14.3; close to SciPy's ``method='asymp'``)."""
    a = np.sort(np.asarray(a, dtype=float))
    b = np.sort(np.asarray(b, dtype=float))
    if a.size == 0 or b.size == 0:
        raise ValueError("both samples need at least one value")
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / a.size
    cdf_b = np.searchsorted(b, values, side="right") / b.size
    d = float(np.max(np.abs(cdf_a - cdf_b)))
    root = math.sqrt(a.size * b.size / (a.size + b.size))
    return d, kolmogorov_sf((root + 0.12 + 0.11 / root) * d)


@dataclass(frozen=True)
class DriftRule:
    """When a site's recent scores count as drifted from its calibration sample (module docstring)."""

    psi_above: float = 0.10
    ks_p_below: float = 0.01
    min_films: int = 30
    min_reference: int = 30
    bins: int = 10

    def text(self) -> str:
        return (
            f"drifted when KS p < {self.ks_p_below} and PSI > {self.psi_above} "
            f"({self.bins} bins at the calibration sample's quantiles), with at least {self.min_films} "
            f"recent films and {self.min_reference} calibration films; otherwise stable "
            "(insufficient: too few films or no calibration sample to compare with)"
        )


@dataclass(frozen=True)
class Drift:
    films: int
    reference_films: int
    psi: float | None
    ks_statistic: float | None
    ks_p_value: float | None
    verdict: str  # "drifted", "stable" or "insufficient"
    why: str

    def as_dict(self) -> dict:
        return asdict(self)


def drift(reference, sample, rule: DriftRule = DriftRule()) -> Drift:
    """Compare ``sample`` (recent scores) with ``reference`` (the calibration sample's) by ``rule``."""
    reference = np.asarray(reference, dtype=float)
    sample = np.asarray(sample, dtype=float)
    n, m = int(sample.size), int(reference.size)
    if m < rule.min_reference:
        why = "no calibration sample to compare with" if m == 0 else f"only {m} calibration films"
        return Drift(n, m, None, None, None, "insufficient", why)
    if n < rule.min_films:
        return Drift(n, m, None, None, None, "insufficient", f"only {n} recent films (< {rule.min_films})")
    index = psi(reference, sample, rule.bins)
    d, p = ks_2samp(reference, sample)
    drifted = p < rule.ks_p_below and index > rule.psi_above
    why = f"PSI {index:.3f}, KS D {d:.3f} (p {p:.2g}): " + (
        "the scores moved beyond chance and by more than a little" if drifted else "within the rule"
    )
    return Drift(n, m, index, d, p, "drifted" if drifted else "stable", why)


def histogram(values, bins: int = 20) -> list[float]:
    """Shares of ``values`` in ``bins`` equal bins over [0, 1] (for the score plot)."""
    values = np.clip(np.asarray(values, dtype=float), 0.0, 1.0)
    if values.size == 0:
        return [0.0] * bins
    counts, _ = np.histogram(values, bins=bins, range=(0.0, 1.0))
    return [float(c) / values.size for c in counts]
