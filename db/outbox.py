"""State transitions of the DICOM outbox: enqueue, claim, sent, retry later, operator retry.

An outbox row is one DICOM object (SR, SC or KOS) for one (film, model version,
destination): the unique key makes :func:`enqueue_results` idempotent, so a
score written twice, a task delivered twice or a rescan never sends twice. A DICOM
film is also keyed by its SOP Instance UID: the same instance received twice (in
two transfer syntaxes: two contents, two images) gets one object, not two.
Like :mod:`db.queue`, every transition is one conditional UPDATE, so two senders
(a ``watch`` and a ``worker`` on the same database) cannot both take a row:
a claim moves ``next_attempt_at`` past a lease, and only the claimer's later
update (matched on ``attempts``) counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from db.engine import dialect_insert
from db.queue import as_utc, scrub_reason
from db.schema import Image, ImageStatus, OutboxItem, OutboxKind, OutboxStatus, Score, SourceFile, utcnow


@dataclass(frozen=True)
class RetryPolicy:
    """How long a claim holds and how failed sends are retried. The values are the worker's settings
    (``outbox_*``), passed down: this module keeps no defaults of its own."""

    #: A claimed row not finished within this long (sender killed) is due again.
    claim_lease_s: float
    #: Retry delays grow as first_retry_s * 2**(attempts-1), capped at max_retry_s ...
    first_retry_s: float
    max_retry_s: float
    #: ... and after max_attempts the row is failed.
    max_attempts: int

    def delay(self, attempts: int) -> float:
        """Seconds to wait before the next attempt, after ``attempts`` failed ones."""
        return min(self.first_retry_s * 2 ** max(attempts - 1, 0), self.max_retry_s)


@dataclass(frozen=True)
class OutboxPlan:
    """Where results go and which objects are made; empty destinations: nothing is sent."""

    destinations: tuple[str, ...] = ()
    kinds: tuple[OutboxKind, ...] = (OutboxKind.STRUCTURED_REPORT,)

    def __bool__(self) -> bool:
        return bool(self.destinations and self.kinds)


NO_RESULTS = OutboxPlan()


def enqueue_results(
    session: Session,
    image_id: int,
    model_version: str,
    plan: OutboxPlan,
    attributes: dict | None = None,
) -> int:
    """Create the outbox rows for a scored film; returns how many were new.

    Only DICOM films with a study are returned (PNG/JPEG have no study to go back to): when
    ``attributes`` (from decoding) say otherwise nothing is queued. Existing rows are left as they
    are (sent once per film, model version, destination and kind). A Key Object Selection is queued
    only for films over the high-confidence threshold.
    """
    if not plan:
        return 0
    attributes = attributes or {}
    if attributes.get("source_format", "dicom") != "dicom" or not attributes.get("study_uid", "x"):
        return 0
    kinds = list(plan.kinds)
    if OutboxKind.KEY_OBJECT in kinds and not _is_high(session, image_id, model_version):
        kinds.remove(OutboxKind.KEY_OBJECT)  # the key object flags HIGH films only
    sop_uid = session.scalar(select(Image.sop_uid).where(Image.id == image_id))  # as stored (whole or none)
    insert = dialect_insert(session)
    now = utcnow()
    created = 0
    for destination in plan.destinations:
        for kind in kinds:
            # No conflict target: either key (this image, or this SOP instance) already there is enough.
            result = session.execute(
                insert(OutboxItem)
                .values(
                    image_id=image_id,
                    model_version=model_version,
                    destination=destination,
                    kind=str(kind),
                    status=OutboxStatus.PENDING,
                    attempts=0,
                    next_attempt_at=now,
                    created_at=now,
                    source_sop_uid=sop_uid or None,
                )
                .on_conflict_do_nothing()
            )
            made = max(result.rowcount or 0, 0)
            if not made and sop_uid:
                made = _take_over(session, image_id, model_version, destination, kind, sop_uid, now)
            created += made
    return created


def _take_over(
    session: Session, image_id: int, model_version: str, destination: str, kind: OutboxKind, sop_uid: str, now
) -> int:
    """The same SOP instance seen again after its first copy's content was gone (superseded) before
    its result could be sent: the failed row is sent for this copy instead (same instance, one result)."""
    first_gone = (
        select(Image.id)
        .where(Image.id == OutboxItem.image_id, Image.status == ImageStatus.SUPERSEDED)
        .exists()
    )
    result = session.execute(
        update(OutboxItem)
        .where(
            OutboxItem.source_sop_uid == sop_uid,
            OutboxItem.model_version == model_version,
            OutboxItem.destination == destination,
            OutboxItem.kind == str(kind),
            OutboxItem.status == OutboxStatus.FAILED,
            OutboxItem.image_id != image_id,
            first_gone,
        )
        .values(
            image_id=image_id, status=OutboxStatus.PENDING, attempts=0, next_attempt_at=now, last_error=None
        )
    )
    return result.rowcount or 0


def _is_high(session: Session, image_id: int, model_version: str) -> bool:
    return bool(
        session.scalar(
            select(Score.high_confidence_positive).where(
                Score.image_id == image_id, Score.model_version == model_version
            )
        )
    )


@dataclass(frozen=True)
class Claimed:
    """What a sender needs to build and send one object."""

    id: int
    image_id: int
    model_version: str
    destination: str
    kind: OutboxKind
    attempts: int
    sop_instance_uid: str | None


def claim_due(session: Session, lease_s: float, limit: int = 16) -> list[Claimed]:
    """Take up to ``limit`` pending rows whose time has come; each is then the caller's for ``lease_s``."""
    now = utcnow()
    due = list(
        session.scalars(
            select(OutboxItem.id)
            .where(OutboxItem.status == OutboxStatus.PENDING, _due(now))
            .order_by(OutboxItem.next_attempt_at, OutboxItem.id)
            .limit(limit)
        )
    )
    if not due:
        return []
    rows = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id.in_(due), OutboxItem.status == OutboxStatus.PENDING, _due(now))
        .values(attempts=OutboxItem.attempts + 1, next_attempt_at=now + timedelta(seconds=lease_s))
        .returning(
            OutboxItem.id,
            OutboxItem.image_id,
            OutboxItem.model_version,
            OutboxItem.destination,
            OutboxItem.kind,
            OutboxItem.attempts,
            OutboxItem.sop_instance_uid,
        )
    ).all()
    return sorted(
        (Claimed(r[0], r[1], r[2], r[3], OutboxKind(r[4]), r[5], r[6]) for r in rows), key=lambda c: c.id
    )


def _due(now: datetime):
    return or_(OutboxItem.next_attempt_at.is_(None), OutboxItem.next_attempt_at <= now)


def remember_uid(session: Session, item: Claimed, sop_instance_uid: str) -> None:
    """Keep the object's SOP Instance UID before the first send, so a resend after a crash reuses it
    (a PACS that already got it then sees the same instance again, not a duplicate)."""
    session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == item.id, OutboxItem.sop_instance_uid.is_(None))
        .values(sop_instance_uid=sop_instance_uid)
    )


def mark_sent(session: Session, item: Claimed) -> bool:
    now = utcnow()
    result = session.execute(
        update(OutboxItem)
        .where(*_still_claimed(item))
        .values(status=OutboxStatus.SENT, sent_at=now, last_error=None, next_attempt_at=None)
    )
    return result.rowcount == 1


def mark_retry(
    session: Session, item: Claimed, error: str, policy: RetryPolicy, *, permanent: bool = False
) -> OutboxStatus:
    """Record a failed attempt: try again after a growing delay, or fail it for good.

    ``permanent`` (the destination refused the object itself, or the source film is gone) fails the
    row at once: resending the same object would be refused the same way. File paths are taken out of
    ``error`` before it is stored (they identify patients).
    """
    final = permanent or item.attempts >= policy.max_attempts
    status = OutboxStatus.FAILED if final else OutboxStatus.PENDING
    session.execute(
        update(OutboxItem)
        .where(*_still_claimed(item))
        .values(
            status=status,
            last_error=scrub_reason(error),
            next_attempt_at=None if final else utcnow() + timedelta(seconds=policy.delay(item.attempts)),
        )
    )
    return status


def _still_claimed(item: Claimed) -> tuple:
    """The row is still pending with the attempt count this claim set: nobody else has moved it."""
    return (
        OutboxItem.id == item.id,
        OutboxItem.status == OutboxStatus.PENDING,
        OutboxItem.attempts == item.attempts,
    )


def release(session: Session, items: Iterable[Claimed]) -> None:
    """Give claimed rows back untouched (shutdown before sending): due now, attempt refunded."""
    for item in items:
        session.execute(
            update(OutboxItem)
            .where(*_still_claimed(item))
            .values(attempts=OutboxItem.attempts - 1, next_attempt_at=utcnow())
        )


@dataclass(frozen=True)
class RetryOutcome:
    """What ``outbox retry`` did: rows queued again, and the ids it was given but left alone."""

    queued: int
    #: Already sent, given by id without ``include_sent``: sending again is asked for explicitly.
    already_sent: tuple[int, ...] = ()
    #: Still pending (perhaps claimed by a running sender, whose claim must stand).
    pending: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()


def retry(
    session: Session,
    *,
    ids: Sequence[int] = (),
    include_sent: bool = False,
    destination: str | None = None,
    new_instance: bool = False,
) -> RetryOutcome:
    """Operator asks again: failed rows (and, with ``include_sent``, sent ones) go back to pending,
    due now, attempts reset; ``ids`` narrows that to those rows.

    Pending rows are never touched: a running sender may hold one (its claim is matched on
    ``attempts``, which a reset would give to a second sender). A sent row given by id without
    ``include_sent`` is left as it is and reported. ``new_instance`` forgets the SOP Instance UID so
    that a fresh object (new UID) is sent, for a PACS that lost or deleted the first one; otherwise
    the same instance is sent again.
    """
    wanted = [OutboxStatus.FAILED, *([OutboxStatus.SENT] if include_sent else [])]
    query = update(OutboxItem).where(OutboxItem.status.in_(wanted))
    already_sent: tuple[int, ...] = ()
    pending: tuple[int, ...] = ()
    missing: tuple[int, ...] = ()
    if ids:
        found = dict(
            session.execute(select(OutboxItem.id, OutboxItem.status).where(OutboxItem.id.in_(ids))).all()
        )
        missing = tuple(sorted(set(ids) - set(found)))
        pending = tuple(sorted(i for i, s in found.items() if s == OutboxStatus.PENDING))
        if not include_sent:
            already_sent = tuple(sorted(i for i, s in found.items() if s == OutboxStatus.SENT))
        query = query.where(OutboxItem.id.in_(list(ids)))
    if destination is not None:
        query = query.where(OutboxItem.destination == destination)
    values: dict = {
        "status": OutboxStatus.PENDING,
        "attempts": 0,
        "next_attempt_at": utcnow(),
        "last_error": None,
    }
    if new_instance:
        values["sop_instance_uid"] = None
    queued = session.execute(query.values(**values)).rowcount
    return RetryOutcome(queued, already_sent, pending, missing)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    image_sha256: str
    kind: str
    destination: str
    status: str
    attempts: int
    next_attempt_at: datetime | None
    last_error: str | None
    created_at: datetime | None
    sent_at: datetime | None

    def as_dict(self) -> dict:
        values = dict(self.__dict__)
        for key in ("next_attempt_at", "created_at", "sent_at"):
            values[key] = values[key].isoformat() if values[key] else None
        return values


def list_items(session: Session, status: OutboxStatus | None = None, limit: int = 100) -> list[OutboxRow]:
    """Newest first; films named by content hash (no patient identifiers)."""
    query = select(
        OutboxItem.id,
        Image.sha256,
        OutboxItem.kind,
        OutboxItem.destination,
        OutboxItem.status,
        OutboxItem.attempts,
        OutboxItem.next_attempt_at,
        OutboxItem.last_error,
        OutboxItem.created_at,
        OutboxItem.sent_at,
    ).join(Image, Image.id == OutboxItem.image_id)
    if status is not None:
        query = query.where(OutboxItem.status == status)
    rows = session.execute(query.order_by(OutboxItem.id.desc()).limit(limit)).all()
    return [
        OutboxRow(*row[:6], as_utc(row[6]), row[7], as_utc(row[8]), as_utc(row[9]))  # type: ignore[arg-type]
        for row in rows
    ]


def counts(session: Session) -> dict[str, int]:
    query = select(OutboxItem.status, func.count()).group_by(OutboxItem.status)
    return {status: count for status, count in session.execute(query)}


def pending_untried(
    session: Session, attempts: int, due_by: datetime | None = None, created_before: datetime | None = None
) -> int:
    """Pending rows worth waiting for: not yet tried ``attempts`` times without success, or rows made
    before ``created_before`` (by an earlier run) whose next try comes by ``due_by`` (that try may
    find the film gone and fail the row with that reason, instead of leaving it pending)."""
    worth = or_(OutboxItem.attempts < attempts, OutboxItem.last_error.is_(None))
    if due_by is not None and created_before is not None:
        earlier = (OutboxItem.created_at < created_before) & (OutboxItem.next_attempt_at <= due_by)
        worth = or_(worth, earlier)
    return session.scalar(
        select(func.count()).select_from(OutboxItem).where(OutboxItem.status == OutboxStatus.PENDING, worth)
    )


@dataclass(frozen=True)
class CalibrationInForce:
    """What the worklist shows for a score now: the active calibration of its model version (its
    thresholds, and its temperature applied to the logit), or the thresholds stored with the score."""

    name: str
    probability: float
    screening_threshold: float
    high_confidence_threshold: float
    temperature: float | None = None

    @classmethod
    def of(cls, session: Session, score: Score) -> CalibrationInForce:
        from db.calibration import SHIPPED, active_calibration

        row = active_calibration(session, score.model_version)
        if row is None:
            return cls(
                SHIPPED,
                score.pneumonia_probability,
                score.screening_threshold,
                score.high_confidence_threshold,
            )
        p = score.pneumonia_probability
        if row.temperature is not None:  # as the worklist view computes it (db.worklist_sql)
            p = 1.0 / (1.0 + math.exp(min(max(-score.pneumonia_logit / row.temperature, -700.0), 700.0)))
        return cls(row.name, p, row.screening_threshold, row.high_confidence_threshold, row.temperature)


@dataclass(frozen=True)
class SendContext:
    """Everything an object is built from: the stored score, the calibration in force, the film's
    content hash and paths (its bytes must still hash to ``sha256``), and its scope flag."""

    score: Score
    paths: list[str]
    sha256: str
    image_status: str
    out_of_scope: bool
    scope_note: str | None
    calibration: CalibrationInForce


def send_context(session: Session, item: Claimed) -> SendContext | None:
    score = session.scalars(
        select(Score).where(Score.image_id == item.image_id, Score.model_version == item.model_version)
    ).one_or_none()
    if score is None:
        return None
    calibration = CalibrationInForce.of(session, score)
    session.expunge(score)
    paths = list(
        session.scalars(
            select(SourceFile.path).where(SourceFile.image_id == item.image_id).order_by(SourceFile.id)
        )
    )
    image = session.execute(
        select(Image.sha256, Image.status, Image.out_of_scope, Image.scope_note).where(
            Image.id == item.image_id
        )
    ).one()
    return SendContext(score, paths, image[0], image[1], bool(image[2]), image[3], calibration)
