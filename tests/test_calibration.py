"""Site calibration: the fitting rule, its CIs, storage and activation (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from db.calibration import (
    SHIPPED,
    CalibrationError,
    ShippedThresholds,
    activate_calibration,
    active_calibration,
    ensure_shipped,
    list_calibrations,
    review_labels,
    store,
    thresholds_in_force,
    tier,
)
from models.calibration import (
    MIN_POSITIVES,
    ThresholdRule,
    calibrate,
    clopper_pearson,
    estimate_at,
    fit_thresholds,
    labels_from_reviews,
    positives_needed,
)
from models.metrics import operating_thresholds

SHIPPED_T = ShippedThresholds("model-x", 0.0734, 0.3826, 0.6747)


def _sample(
    n_pos: int, n_neg: int, separation: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = np.r_[rng.normal(separation, 1.0, n_pos), rng.normal(-separation, 1.0, n_neg)]
    y = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    return y, 1 / (1 + np.exp(-logits)), logits


# -- the rule --------------------------------------------------------------------------------------
def test_screening_threshold_never_above_the_whole_sample_fit_and_high_never_below_screening():
    for seed, separation in ((0, 1.0), (1, 1.5), (2, 3.0)):
        y, prob, _ = _sample(60, 40, separation, seed)
        screening, high = fit_thresholds(y, prob, ThresholdRule(draws=300, seed=seed))
        whole_screening, whole_high = operating_thresholds(y, prob, 0.98, 0.95)
        assert screening <= whole_screening + 1e-12
        assert high >= max(whole_high, screening) - 1e-12


def test_where_classes_separate_the_screening_threshold_drops_into_the_gap():
    y, prob, _ = _sample(60, 40, 4.0, seed=3)
    screening, high = fit_thresholds(y, prob, ThresholdRule(draws=300))
    # the sample alone would put it at the lower edge of the positives; the rule spends the
    # specificity the sample can spare (floor 0.90) on sensitivity
    assert screening < operating_thresholds(y, prob, 0.98, 0.95)[0]
    spec_at_screening = np.mean(prob[y == 0] < screening)
    assert 0.85 <= spec_at_screening <= 1.0
    assert np.mean(prob[y == 0] < high) >= 0.95


def test_confidence_intervals_contain_the_point_and_exact_bounds_are_honest_at_100_percent():
    y, prob, _ = _sample(60, 40, 2.0, seed=4)
    estimate = estimate_at(y, prob, 0.5, draws=500)
    for interval in (estimate.sensitivity, estimate.specificity):
        assert interval.low <= interval.value <= interval.high
        assert interval.exact_low <= interval.value <= interval.exact_high
    low, high = clopper_pearson(60, 60)
    assert high == 1.0 and low == pytest.approx(0.025 ** (1 / 60), abs=1e-6)
    assert clopper_pearson(0, 10)[0] == 0.0
    assert positives_needed(0.98) == 183  # 0.98 ** 183 < 0.025 <= 0.98 ** 182


def test_small_sample_is_said_plainly():
    y, prob, logits = _sample(20, 10, 2.0, seed=5)
    fit = calibrate(y, prob, logits, 0.6747, ThresholdRule(draws=200))
    assert fit.too_small
    assert any("sample too small" in w for w in fit.warnings)
    assert any(">= 183 positives" in w for w in fit.warnings)
    big = calibrate(*_sample(MIN_POSITIVES, 30, 2.0, seed=6), rule=ThresholdRule(draws=200))
    assert not big.too_small
    details = big.details()
    json.dumps(details)  # stored as JSON
    assert details["screening"]["sensitivity"]["low"] <= details["screening"]["sensitivity"]["value"]
    assert big.site_temperature is not None and big.site_temperature > 0


def test_refuses_one_class_and_bad_targets():
    with pytest.raises(ValueError):
        calibrate(np.ones(10), np.linspace(0, 1, 10))
    with pytest.raises(ValueError):
        calibrate(*_sample(60, 40, 2.0)[:2], rule=ThresholdRule(target_sensitivity=1.0))


def test_labels_from_reviews_agree_keeps_disagree_flips():
    labels = labels_from_reviews(
        [("agree", 0.9, 0.5), ("agree", 0.1, 0.5), ("disagree", 0.9, 0.5), ("disagree", 0.1, 0.5)]
    )
    assert labels.tolist() == [1, 0, 0, 1]


# -- storage ---------------------------------------------------------------------------------------
def _store_site_a(
    session,
    thresholds: tuple[float, float],
    *,
    sample_size: int = 100,
    positives: int = 60,
    targets: tuple[float | None, float | None] = (0.98, 0.95),
    details: dict | None = None,
) -> None:
    """Store a calibration "site-a" of model-x from labels, (screening, high-confidence) thresholds."""
    store(
        session,
        name="site-a",
        model_version="model-x",
        screening_threshold=thresholds[0],
        high_confidence_threshold=thresholds[1],
        source="labels",
        sample_size=sample_size,
        positives=positives,
        target_sensitivity=targets[0],
        target_specificity=targets[1],
        details=details,
    )


def test_store_activate_and_go_back_to_shipped(url):
    from db.engine import session_scope

    with session_scope(url) as session:
        assert active_calibration(session, "model-x") is None
        assert thresholds_in_force(session, SHIPPED_T) == (SHIPPED, 0.0734, 0.3826)
        shipped = ensure_shipped(session, SHIPPED_T)
        assert shipped.active and shipped.source == "shipped"
        _store_site_a(session, (0.2, 0.7), details={"screening": {"x": 1}})
    with session_scope(url) as session:
        row = active_calibration(session, "model-x")
        assert (row.name, row.screening_threshold, row.high_confidence_threshold) == ("site-a", 0.2, 0.7)
        assert [r.name for r in list_calibrations(session, "model-x")] == [SHIPPED, "site-a"]
        assert sum(r.active for r in list_calibrations(session)) == 1
        with pytest.raises(CalibrationError):
            _store_site_a(session, (0.1, 0.2), sample_size=1, positives=1, targets=(None, None))
    with session_scope(url) as session:
        activate_calibration(session, "model-x", SHIPPED)
    with session_scope(url) as session:
        assert thresholds_in_force(session, SHIPPED_T) == (SHIPPED, 0.0734, 0.3826)
        with pytest.raises(CalibrationError, match="no calibration named"):
            activate_calibration(session, "model-x", "nope")
    assert tier(0.5, 0.2, 0.7) == "screen_positive" and tier(0.5, 0.0734, 0.3826) == "high_confidence"


def test_review_labels_use_the_reader_label_and_the_stored_score(url):
    from db.engine import session_scope
    from db.schema import Image, Review, Score

    with session_scope(url) as session:
        for i, (prob, decision, label) in enumerate(
            [(0.9, "agree", "pneumonia"), (0.8, "disagree", "normal"), (0.05, "disagree", "pneumonia")]
        ):
            image = Image(sha256=f"{i:064d}", status="scored")
            session.add(image)
            session.flush()
            session.add(
                Score(
                    image_id=image.id,
                    model_version="model-x",
                    pneumonia_probability=prob,
                    pneumonia_logit=0.0,
                    screening_threshold=0.0734,
                    high_confidence_threshold=0.3826,
                    screening_positive=prob >= 0.0734,
                    high_confidence_positive=prob >= 0.3826,
                )
            )
            session.add(Review(image_id=image.id, username="r", decision=decision, reader_label=label))
    with session_scope(url) as session:
        found = review_labels(session, "model-x")
    assert [(r.label, r.probability) for r in found] == [(1, 0.9), (0, 0.8), (1, 0.05)]


def test_evaluation_report_carries_cis_and_the_active_calibration():
    from models.evaluate import EvaluationReport, _intervals
    from models.metrics import operating_point

    y, prob, _ = _sample(60, 40, 2.0, seed=7)
    report = EvaluationReport(
        model_version="model-x",
        images=100,
        positives=60,
        roc_auc=0.9,
        viral_roc_auc=None,
        screening=operating_point(y, prob, 0.0734),
        high_confidence=operating_point(y, prob, 0.3826),
        labels=y,
        probabilities=prob,
    )
    report.intervals = _intervals(y, prob, 0.0734, 0.3826)
    report.add_calibration("active calibration 'site-a'", 0.3, 0.8)
    data = report.as_dict()
    assert data["intervals"]["roc_auc"]["low"] <= data["intervals"]["roc_auc"]["value"]
    point = data["calibrations"]["active calibration 'site-a'"]["screening"]
    assert point["threshold"] == 0.3 and point["sensitivity"]["low"] <= point["sensitivity"]["value"]
    assert "active calibration 'site-a', screening 0.3000" in report.text()
    json.dumps(data)


def test_calibrate_from_reviews_uses_the_readers_labels(tmp_path, model_dir):
    """Agree keeps the model's call, Disagree flips it; the command reports the count and balance."""
    import subprocess
    import sys
    from pathlib import Path

    from db.engine import session_scope
    from db.migrate import upgrade
    from db.schema import Image, Review, Score

    version = json.loads((model_dir / "metadata.json").read_text())["version"]
    url = f"sqlite:///{tmp_path / 'reviews.sqlite3'}"
    upgrade(url)
    y, prob, logits = _sample(60, 40, 2.0, seed=8)
    with session_scope(url) as session:
        for i, (label, p, z) in enumerate(zip(y, prob, logits, strict=True)):
            image = Image(sha256=f"{i:064x}", status="scored")
            session.add(image)
            session.flush()
            call = p >= 0.5
            session.add(
                Score(
                    image_id=image.id,
                    model_version=version,
                    pneumonia_probability=float(p),
                    pneumonia_logit=float(z),
                    screening_threshold=0.5,
                    high_confidence_threshold=0.9,
                    screening_positive=bool(call),
                    high_confidence_positive=bool(p >= 0.9),
                )
            )
            decision = "agree" if call == bool(label) else "disagree"
            reader = "pneumonia" if label else "normal"
            session.add(Review(image_id=image.id, username="reader", decision=decision, reader_label=reader))
    cli = str(Path(sys.executable).parent / "cxr-triage")
    result = subprocess.run(
        [cli, "model", "calibrate", "--from-reviews", "--name", "readers", "--json", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "100 films with a label" in result.stderr and "(60 pneumonia, 40 normal)" in result.stderr
    fit = json.loads(result.stdout)
    assert fit["sample_size"] == 100 and fit["positives"] == 60
    with session_scope(url) as session:
        row = active_calibration(session, version)
        assert row.name == "readers" and row.source == "reviews"


def test_site_draws_keep_each_patient_on_one_side_and_report_the_targets():
    """models.site_draws (the card's repeated-draws table): a draw fits on 40 + 60 patients' films
    and checks on the films of the other patients only."""
    from models.site_draws import HeldOut, one_draw, summarise

    rng = np.random.default_rng(3)
    patients = np.repeat([f"p{i}" for i in range(300)], 2)  # two films per patient
    labels = np.repeat((np.arange(300) >= 100).astype(int), 2)
    prob = np.clip(np.where(labels == 1, 0.8, 0.2) + rng.normal(0, 0.12, labels.size), 0.001, 0.999)
    held = HeldOut(labels, patients, prob, np.log(prob / (1 - prob)), 1.0, rejected=0)
    draw = one_draw(held, np.random.default_rng(0))
    assert draw["remaining"] == labels.size - 2 * 100  # both films of each of the 100 sampled patients
    assert 0 < draw["screening_threshold"] <= draw["high_confidence_threshold"] < 1
    summary = summarise([draw, one_draw(held, np.random.default_rng(1))])
    assert summary["all_targets_met"].endswith("of 2")
    assert summary["screening_sensitivity"]["worst"] <= summary["screening_sensitivity"]["mean"]
