"""The quality report: per site and per week, what the model did and whether its score still means
what it meant when the site was calibrated (``cxr-triage quality``, the ``/quality`` page, metrics).

Everything is read from the tables in a handful of queries and computed here with
:mod:`db.quality_stats`. The tier of a film is its tier in the worklist (``worklist_order``: its
site's calibration in force now). The score distribution is compared with the fitting sample of the
calibration the site's newest film follows (``details.sample_logits``, stored by
``model calibrate``); the shipped calibration has no such sample, so a site on the shipped
thresholds gets the verdict ``insufficient`` until it is calibrated.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.calibration import details_of
from db.quality_stats import Drift, DriftRule, drift, histogram, wilson
from db.queue import as_utc
from db.schema import Calibration, Image, ImageStatus, Review, Score, WorklistOrder
from db.sites import site_names

#: The window of the drift comparison and of the per-site gauges.
DRIFT_DAYS = 7
#: Weeks shown when no ``since`` is given.
DEFAULT_WEEKS = 12
HISTOGRAM_BINS = 20


@dataclass(frozen=True)
class FilmRow:
    image_id: int
    site: str
    status: str
    reason: str | None
    out_of_scope: bool
    first_seen_at: datetime
    tier: str | None
    calibration_id: int | None
    logit: float | None
    probability: float | None


@dataclass(frozen=True)
class ReviewRow:
    decision: str
    reader_label: str


def default_since(now: datetime) -> date:
    """The Monday :data:`DEFAULT_WEEKS` weeks back."""
    day = (now - timedelta(weeks=DEFAULT_WEEKS - 1)).date()
    return day - timedelta(days=day.weekday())


def week_of(moment: datetime) -> str:
    year, week, _ = moment.isocalendar()
    return f"{year}-W{week:02d}"


def week_start(moment: datetime) -> date:
    day = moment.date()
    return day - timedelta(days=day.weekday())


def load_films(session: Session, since: datetime, site: str | None = None) -> list[FilmRow]:
    query = (
        select(
            Image.id,
            Image.site,
            Image.status,
            Image.reason,
            Image.out_of_scope,
            Image.first_seen_at,
            WorklistOrder.tier,
            WorklistOrder.calibration_id,
            Score.pneumonia_logit,
            Score.pneumonia_probability,
        )  # fmt: skip
        .join(WorklistOrder, WorklistOrder.image_id == Image.id)
        .outerjoin(Score, Score.id == WorklistOrder.score_id)
        .where(Image.first_seen_at >= since, Image.status != ImageStatus.SUPERSEDED)
        .order_by(Image.first_seen_at, Image.id)
    )
    if site is not None:
        query = query.where(Image.site == site)
    return [FilmRow(*row[:5], as_utc(row[5]), *row[6:]) for row in session.execute(query)]


def load_reviews(session: Session, image_ids: Iterable[int]) -> dict[int, ReviewRow]:
    """The latest review of each of ``image_ids``."""
    ids = list(image_ids)
    latest: dict[int, ReviewRow] = {}
    for start in range(0, len(ids), 500):
        query = (
            select(Review.image_id, Review.decision, Review.reader_label)
            .where(Review.image_id.in_(ids[start : start + 500]))
            .order_by(Review.created_at, Review.id)
        )
        for image_id, decision, label in session.execute(query):
            latest[image_id] = ReviewRow(decision, label)
    return latest


def _sigmoid(logits: np.ndarray, temperature: float | None) -> np.ndarray:
    t = temperature or 1.0
    return 1.0 / (1.0 + np.exp(np.clip(-logits / t, -700, 700)))


def film_scores(films: list[FilmRow], calibration: Calibration | None) -> np.ndarray:
    """The scores the worklist shows (the calibration's temperature applied to the logit)."""
    if calibration is None or calibration.temperature is None:
        return np.array([f.probability for f in films], dtype=float)
    return _sigmoid(np.array([f.logit for f in films], dtype=float), calibration.temperature)


def reference_scores(calibration: Calibration | None) -> np.ndarray:
    """The calibration's fitting sample as scores (empty where none was stored: the shipped one)."""
    if calibration is None:
        return np.array([])
    logits = np.array(details_of(calibration).get("sample_logits") or [], dtype=float)
    return _sigmoid(logits, calibration.temperature) if logits.size else logits


def counts(
    films: list[FilmRow], reviews: dict[int, ReviewRow], classify: Callable[[str | None], str]
) -> dict:
    """Films, outcomes, flagged shares and review agreement of ``films`` (each share a Wilson interval)."""
    scored = [f for f in films if f.status == ImageStatus.SCORED and f.tier is not None]
    flagged = [f for f in scored if f.tier in ("HIGH", "screen+")]
    high = [f for f in scored if f.tier == "HIGH"]
    reviewed = [f for f in scored if f.image_id in reviews]
    pneumonia = {f.image_id for f in reviewed if reviews[f.image_id].reader_label == "pneumonia"}
    agree = sum(reviews[f.image_id].decision == "agree" for f in reviewed)
    reviewed_high = [f for f in reviewed if f.tier == "HIGH"]
    reviewed_flagged = [f for f in reviewed if f.tier in ("HIGH", "screen+")]
    reviewed_below = [f for f in reviewed if f.tier == "below"]
    missed = sum(f.image_id in pneumonia for f in reviewed_below)
    rejected = Counter(classify(f.reason) for f in films if f.status == ImageStatus.REJECTED)
    return {
        "films": len(films),
        "scored": len(scored),
        "rejected": sum(rejected.values()),
        "rejected_by_class": dict(sorted(rejected.items())),
        "failed": sum(f.status == ImageStatus.FAILED for f in films),
        "out_of_scope": sum(bool(f.out_of_scope) for f in films),
        "flagged_screen": wilson(len(flagged), len(scored)).as_dict(),
        "flagged_high": wilson(len(high), len(scored)).as_dict(),
        "reviews": {
            "count": len(reviewed),
            "share_reviewed": wilson(len(reviewed), len(scored)).as_dict(),
            "agreement": wilson(agree, len(reviewed)).as_dict(),
            "ppv_high": wilson(
                sum(f.image_id in pneumonia for f in reviewed_high), len(reviewed_high)
            ).as_dict(),
            "ppv_screen": wilson(
                sum(f.image_id in pneumonia for f in reviewed_flagged), len(reviewed_flagged)
            ).as_dict(),
            "false_negatives": missed,
            # of the reviewed below-threshold films, the share the reader called pneumonia
            "false_omission": wilson(missed, len(reviewed_below)).as_dict(),
        },
    }


def site_drift(
    films: list[FilmRow], calibrations: dict[int, Calibration], now: datetime, rule: DriftRule
) -> tuple[Calibration | None, Drift, np.ndarray, np.ndarray]:
    """(the calibration in force, the drift of the last :data:`DRIFT_DAYS` days against its sample,
    the recent scores, the sample's scores)."""
    followed = [f for f in films if f.calibration_id is not None and f.tier is not None]
    calibration = calibrations.get(followed[-1].calibration_id) if followed else None
    start = now - timedelta(days=DRIFT_DAYS)
    recent = [
        f
        for f in followed
        if f.first_seen_at >= start and calibration is not None and f.calibration_id == calibration.id
    ]
    current = film_scores(recent, calibration) if recent else np.array([])
    reference = reference_scores(calibration)
    return calibration, drift(reference, current, rule), current, reference


def _calibration_dict(row: Calibration | None) -> dict | None:
    if row is None:
        return None
    return {
        "name": row.name,
        "site": row.site,
        "model_version": row.model_version,
        "screening_threshold": row.screening_threshold,
        "high_confidence_threshold": row.high_confidence_threshold,
        "sample_size": row.sample_size,
        "created_at": as_utc(row.created_at).isoformat(),
    }


def quality_report(
    session: Session,
    *,
    site: str | None = None,
    since: date | None = None,
    classify: Callable[[str | None], str] = lambda reason: "rejected",
    now: datetime | None = None,
    rule: DriftRule | None = None,
) -> dict:
    """The report as JSON-ready data: one part per site (``site`` alone when given), each with its
    weeks, totals, drift verdict and the data of its two plots. ``classify`` names the class of a
    rejection reason (the worker's ``outcomes.classify``; the db layer does not know the classes)."""
    now = now or datetime.now(UTC)
    since = since or default_since(now)
    rule = rule or DriftRule()
    start = datetime.combine(since, time.min, tzinfo=UTC)
    # the drift window may reach before ``since``
    films = load_films(session, min(start, now - timedelta(days=DRIFT_DAYS)), site)
    reviews = load_reviews(session, (f.image_id for f in films))
    ids = {f.calibration_id for f in films if f.calibration_id is not None}
    calibrations = {c.id: c for c in session.scalars(select(Calibration).where(Calibration.id.in_(ids)))}
    by_site: dict[str, list[FilmRow]] = defaultdict(list)
    for film in films:
        by_site[film.site].append(film)
    names = [site] if site is not None else site_names(session)
    parts = []
    for name in names:
        site_films = by_site.get(name, [])
        shown = [f for f in site_films if f.first_seen_at >= start]
        weeks: dict[str, list[FilmRow]] = defaultdict(list)
        for film in shown:
            weeks[week_of(film.first_seen_at)].append(film)
        calibration, verdict, current, reference = site_drift(site_films, calibrations, now, rule)
        parts.append(
            {
                "site": name,
                "calibration": _calibration_dict(calibration),
                "last_film_at": site_films[-1].first_seen_at.isoformat() if site_films else None,
                "totals": counts(shown, reviews, classify),
                "weeks": [
                    {"week": week, "start": week_start(rows[0].first_seen_at).isoformat()}
                    | counts(rows, reviews, classify)
                    for week, rows in sorted(weeks.items())
                ],
                "drift": {"window_days": DRIFT_DAYS} | verdict.as_dict(),
                "histogram": {
                    "bins": HISTOGRAM_BINS,
                    "recent": histogram(current, HISTOGRAM_BINS),
                    "calibration_sample": histogram(reference, HISTOGRAM_BINS),
                },
            }
        )
    return {
        "generated_at": now.isoformat(),
        "since": since.isoformat(),
        "drift_rule": rule.text(),
        "sites": parts,
    }


@dataclass(frozen=True)
class SiteGauges:
    """What Prometheus scrapes per site (worker/metrics): the last :data:`DRIFT_DAYS` days."""

    site: str
    films: int
    flagged_screen: float | None
    flagged_high: float | None
    reviewed: float | None
    psi: float | None
    ks_p_value: float | None
    drifted: bool
    last_film_age_seconds: float | None


def site_gauges(
    session: Session, now: datetime | None = None, rule: DriftRule | None = None
) -> list[SiteGauges]:
    """Per site: flagged and reviewed shares, PSI, KS p and verdict of the last 7 days, and the age
    of its newest film (for "no films from site X for N hours")."""
    now = now or datetime.now(UTC)
    rule = rule or DriftRule()
    films = load_films(session, now - timedelta(days=DRIFT_DAYS))
    reviews = load_reviews(session, (f.image_id for f in films))
    ids = {f.calibration_id for f in films if f.calibration_id is not None}
    calibrations = {c.id: c for c in session.scalars(select(Calibration).where(Calibration.id.in_(ids)))}
    newest = dict(
        session.execute(select(Image.site, func.max(Image.first_seen_at)).group_by(Image.site)).all()
    )
    by_site: dict[str, list[FilmRow]] = defaultdict(list)
    for film in films:
        by_site[film.site].append(film)
    out = []
    for name in site_names(session):
        rows = by_site.get(name, [])
        shares = counts(rows, reviews, lambda reason: "rejected")
        _, verdict, _, _ = site_drift(rows, calibrations, now, rule)
        last = as_utc(newest.get(name))
        out.append(
            SiteGauges(
                site=name,
                films=shares["films"],
                flagged_screen=shares["flagged_screen"]["estimate"],
                flagged_high=shares["flagged_high"]["estimate"],
                reviewed=shares["reviews"]["share_reviewed"]["estimate"],
                psi=verdict.psi,
                ks_p_value=verdict.ks_p_value,
                drifted=verdict.verdict == "drifted",
                last_film_age_seconds=None if last is None else max((now - last).total_seconds(), 0.0),
            )
        )
    return out
