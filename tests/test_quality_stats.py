"""The quality report's statistics (db/quality_stats.py) against known values and by simulation."""

from __future__ import annotations

import numpy as np
import pytest

from db.quality_stats import DriftRule, drift, histogram, kolmogorov_sf, ks_2samp, psi, wilson


def test_wilson_interval_matches_published_values():
    # Newcombe (1998), table I: 0/10 -> 0 to 0.2775; 5/10 -> 0.2366 to 0.7634; 81/263 -> 0.2553 to 0.3662
    for k, n, low, high in ((0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (81, 263, 0.2553, 0.3662)):
        p = wilson(k, n)
        assert p.estimate == pytest.approx(k / n)
        assert (p.low, p.high) == (pytest.approx(low, abs=1e-4), pytest.approx(high, abs=1e-4))
    assert wilson(0, 0).estimate is None
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_kolmogorov_distribution_known_quantiles():
    # the 5 % and 1 % critical values of the Kolmogorov distribution: 1.3581 and 1.6276
    assert kolmogorov_sf(1.3581) == pytest.approx(0.05, abs=5e-4)
    assert kolmogorov_sf(1.6276) == pytest.approx(0.01, abs=2e-4)
    assert kolmogorov_sf(0.0) == 1.0 and kolmogorov_sf(5.0) < 1e-20


def test_ks_statistic_is_the_largest_gap_between_the_two_step_functions():
    a, b = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.25, 0.35, 0.45, 0.55, 0.65])
    grid = np.linspace(0, 1, 10001)
    brute = np.max(np.abs((a[:, None] <= grid).mean(0) - (b[:, None] <= grid).mean(0)))
    assert ks_2samp(a, b)[0] == pytest.approx(brute)
    assert ks_2samp(a, a) == (0.0, 1.0)


def test_ks_p_value_is_uniform_under_the_null_and_small_for_a_shift():
    rng = np.random.default_rng(0)
    p = np.array([ks_2samp(rng.normal(size=150), rng.normal(size=100))[1] for _ in range(400)])
    assert 0.0 <= np.mean(p < 0.05) <= 0.08  # conservative for the discrete statistic, never liberal
    assert ks_2samp(rng.normal(size=150), rng.normal(0.6, 1, size=100))[1] < 1e-3


def test_psi_known_value_and_invariance():
    reference = np.repeat([0.1, 0.3, 0.6, 0.9], 25)  # four bins of 25 at the reference's quantiles
    sample = np.repeat([0.1, 0.3, 0.6, 0.9], [50, 25, 15, 10])
    r = (np.array([25, 25, 25, 25]) + 0.5) / 102
    s = (np.array([50, 25, 15, 10]) + 0.5) / 102
    assert psi(reference, sample, bins=4) == pytest.approx(np.sum((s - r) * np.log(s / r)))
    rng = np.random.default_rng(1)
    x, y = rng.beta(2, 3, 200), rng.beta(2, 2, 300)
    logit = lambda v: np.log(v / (1 - v))  # noqa: E731
    assert psi(x, y) == pytest.approx(psi(logit(x), logit(y)))
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)


def test_drift_rule_flags_a_changed_case_mix_and_keeps_the_same_mix_stable():
    """A calibration sample of 100 films (60 pneumonia) against 150 recent films: the same mix is
    called stable in at least 97 % of draws; only normal films are called drifted every time."""
    rng = np.random.default_rng(2)

    def films(n: int, pneumonia_share: float) -> np.ndarray:
        sick = rng.random(n) < pneumonia_share
        return np.where(sick, rng.beta(6, 2, n), rng.beta(2, 6, n))

    false_alarms = sum(drift(films(100, 0.6), films(150, 0.6)).verdict == "drifted" for _ in range(300))
    assert false_alarms <= 9
    assert all(drift(films(100, 0.6), films(150, 0.0)).verdict == "drifted" for _ in range(50))
    assert drift(films(100, 0.6), films(10, 0.0)).verdict == "insufficient"
    assert drift([], films(150, 0.6)).verdict == "insufficient"
    assert "KS p < 0.01" in DriftRule().text()


def test_histogram_shares():
    assert histogram([0.0, 0.5, 1.0, 1.0], bins=2) == [0.25, 0.75]
    assert histogram([], bins=3) == [0.0, 0.0, 0.0]
