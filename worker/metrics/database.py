"""The gauges read from the database at scrape time (one short transaction)."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import case, func, select
from sqlalchemy.exc import SQLAlchemyError

from db.schema import Calibration, Image, ImageStatus, Score


def read_gauges(engine, model_version: str) -> dict:
    """Queue depth by status, and per tier the unreviewed count and the age of the oldest one.

    The age is counted from the film's registration (``first_seen_at``), as the worklist's
    aging rule does: what matters at 3 a.m. is how long a likely pneumonia has been waiting.
    """
    now = datetime.now(UTC)
    latest = select(Score.image_id, func.max(Score.id).label("score_id")).group_by(Score.image_id).subquery()
    tier = case(
        (Score.high_confidence_positive, "high"), (Score.screening_positive, "screening"), else_="below"
    )
    with engine.connect() as connection:
        queue = dict(
            connection.execute(
                select(Image.status, func.count())
                .where(Image.status.in_([ImageStatus.QUEUED, ImageStatus.PROCESSING]))
                .group_by(Image.status)
            ).all()
        )
        rows = connection.execute(
            select(tier, func.min(Image.first_seen_at), func.count())
            .select_from(Image)
            .join(latest, latest.c.image_id == Image.id)
            .join(Score, Score.id == latest.c.score_id)
            .where(Image.status == ImageStatus.SCORED, Image.reviewed_at.is_(None))
            .group_by(tier)
        ).all()
        calibration = _active_calibration(connection, model_version)
    return {
        "queue": {str(status): count for status, count in queue.items()},
        "oldest": {name: _age(oldest, now) for name, oldest, _ in rows},
        "unreviewed": {name: count for name, _, count in rows},
        "calibration": calibration,
    }


def read_site_gauges(engine) -> list:
    """Per-site shares and drift of the last 7 days (db/quality.py; empty on a schema without sites).

    Not a readiness check: it reads a week of films, so the probe runs it beside the checks and
    keeps its last result (worker/metrics/server.py)."""
    from sqlalchemy.orm import Session

    from db.quality import site_gauges

    try:
        with Session(bind=engine) as session:
            return site_gauges(session)
    except SQLAlchemyError:  # an older revision
        return []


def _active_calibration(connection, model_version: str) -> dict[str, str]:
    try:
        row = connection.execute(
            select(Calibration.name, Calibration.screening_threshold, Calibration.high_confidence_threshold)
            .where(
                Calibration.model_version == model_version,
                Calibration.active.is_(True),
                Calibration.site.is_(None),  # the one for every site; per site: cxr_triage_site_*
            )
            .order_by(Calibration.id.desc())
            .limit(1)
        ).first()
    except SQLAlchemyError:  # a schema without calibrations (older revision)
        connection.rollback()
        return {}
    if row is None:
        return {}
    return {
        "calibration": row.name,
        "screening_threshold": str(row.screening_threshold),
        "high_confidence_threshold": str(row.high_confidence_threshold),
    }


def _age(moment: datetime | None, now: datetime) -> float:
    if moment is None:
        return 0.0
    if moment.tzinfo is None:  # SQLite returns naive datetimes; everything stored is UTC
        moment = moment.replace(tzinfo=UTC)
    return max((now - moment).total_seconds(), 0.0)
