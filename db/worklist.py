"""The triage worklist: what a radiologist should read first.

Ordering (the aging rule, also in the README):

1. Unreviewed scored films, by ``priority`` (highest first), where

       priority = 100 x P(pneumonia)
                + 100 if P >= the model's screening threshold
                + 100 more if P >= the high-confidence threshold
                + AGING_POINTS_PER_DAY (10) x days since the file arrived

   so likely pneumonia comes first, and a film below the threshold gains 10
   points a day: it cannot sink forever (after ~10 days it reaches the
   screening-positive tier, after ~20 days the high-confidence tier).
2. Films that could not be scored (failed, rejected): a person must look at
   them by hand; newest first.
3. Films still in progress (queued, processing).
4. Reviewed films, most recently reviewed first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.queue import as_utc
from db.schema import Image, ImageStatus, Score, SourceFile, utcnow

AGING_POINTS_PER_DAY = 10.0
SCREENING_BONUS = 100.0
HIGH_CONFIDENCE_BONUS = 100.0

INTENDED_USE = (
    "Research triage aid, not a diagnostic device. Validated on paediatric (1-5 years) "
    "anterior-posterior chest films from one hospital; every film still needs a radiologist's read."
)


@dataclass(frozen=True)
class WorklistEntry:
    path: str | None
    paths: list[str]
    sha256: str
    status: str
    reason: str | None
    score: float | None
    threshold: float | None
    high_confidence_threshold: float | None
    screening_positive: bool | None
    high_confidence: bool | None
    viral_probability: float | None
    priority: float | None
    model_version: str | None
    out_of_scope: bool
    scope_note: str | None
    study_uid: str | None
    sop_uid: str | None
    accession_number: str | None
    source_format: str | None
    first_seen_at: str
    reviewed_at: str | None

    def as_dict(self) -> dict:
        return asdict(self)


def priority_of(score: Score, first_seen_at: datetime, now: datetime) -> float:
    days_waiting = max((now - as_utc(first_seen_at)).total_seconds(), 0.0) / 86400.0
    value = 100.0 * score.pneumonia_probability + AGING_POINTS_PER_DAY * days_waiting
    if score.screening_positive:
        value += SCREENING_BONUS
    if score.high_confidence_positive:
        value += HIGH_CONFIDENCE_BONUS
    return round(value, 2)


def _sort_key(entry: WorklistEntry) -> tuple:
    if entry.reviewed_at is not None:
        return (3, _negated_time(entry.reviewed_at))
    if entry.status == ImageStatus.SCORED:
        return (0, -(entry.priority or 0.0))
    if entry.status in (ImageStatus.FAILED, ImageStatus.REJECTED):
        return (1, _negated_time(entry.first_seen_at))
    return (2, entry.first_seen_at)


def _negated_time(iso: str) -> float:
    return -datetime.fromisoformat(iso).timestamp()


def latest_scores(session: Session, image_ids: list[int]) -> dict[int, Score]:
    latest: dict[int, Score] = {}
    for score in session.scalars(select(Score).where(Score.image_id.in_(image_ids)).order_by(Score.id)):
        latest[score.image_id] = score
    return latest


def build_worklist(
    session: Session, status: str | None = None, limit: int | None = None
) -> list[WorklistEntry]:
    query = select(Image)
    if status:
        query = query.where(Image.status == status)
    images = list(session.scalars(query))
    ids = [image.id for image in images]
    paths: dict[int, list[str]] = {}
    scores: dict[int, Score] = {}
    for chunk_start in range(0, len(ids), 5000):  # keep IN lists bounded
        chunk = ids[chunk_start : chunk_start + 5000]
        for image_id, path in session.execute(
            select(SourceFile.image_id, SourceFile.path)
            .where(SourceFile.image_id.in_(chunk))
            .order_by(SourceFile.id)
        ):
            paths.setdefault(image_id, []).append(path)
        scores.update(latest_scores(session, chunk))
    now = utcnow()
    entries = [_entry(image, paths.get(image.id, []), scores.get(image.id), now) for image in images]
    entries.sort(key=_sort_key)
    return entries[:limit] if limit else entries


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None


def _entry(image: Image, paths: list[str], score: Score | None, now: datetime) -> WorklistEntry:
    scored = image.status == ImageStatus.SCORED and score is not None
    return WorklistEntry(
        path=paths[0] if paths else None,
        paths=paths,
        sha256=image.sha256,
        status=image.status,
        reason=image.reason,
        score=round(score.pneumonia_probability, 4) if scored else None,
        threshold=score.screening_threshold if scored else None,
        high_confidence_threshold=score.high_confidence_threshold if scored else None,
        screening_positive=score.screening_positive if scored else None,
        high_confidence=score.high_confidence_positive if scored else None,
        viral_probability=round(score.viral_probability, 4)
        if scored and score.viral_probability is not None
        else None,
        priority=priority_of(score, image.first_seen_at, now)
        if scored and image.reviewed_at is None
        else None,
        model_version=score.model_version if scored else None,
        out_of_scope=image.out_of_scope,
        scope_note=image.scope_note,
        study_uid=image.study_uid,
        sop_uid=image.sop_uid,
        accession_number=image.accession_number,
        source_format=image.source_format,
        first_seen_at=_iso(image.first_seen_at),
        reviewed_at=_iso(image.reviewed_at),
    )
