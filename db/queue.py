"""State transitions of images: register, claim, record outcome, requeue.

Every transition is a single conditional UPDATE or INSERT, so that two workers
racing on the same image (a task redelivered while the first is still alive)
cannot both move it, and a result written twice leaves one row.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import and_, bindparam, delete, func, literal, or_, select, update
from sqlalchemy.orm import Session

from db.attributes import clean_text, to_columns
from db.engine import dialect_insert
from db.paths import from_db, from_db_one, to_db
from db.schema import FINAL_STATUSES, Image, ImageStatus, Score, SourceFile, utcnow
from db.sites import SiteRules, load_rules

#: A file whose processing killed its worker this many times is failed, not retried.
MAX_ATTEMPTS = 3

#: The values that hand an image's lease back: nobody holds it (every release and requeue writes them).
_UNLEASED = {"lease_expires_at": None, "lease_owner": None}

#: The tables, for the statements run once per film (register, add_score, _finish): a statement on
#: the table skips the ORM's DML layer, which took half the CPU of these calls (issue 13: about
#: 1.5 ms of the ~45 ms a film costs a scan). Nothing here needs the ORM's session synchronisation.
_images, _sources, _scores = Image.__table__, SourceFile.__table__, Score.__table__


def as_utc(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything stored here is UTC."""
    if moment is None or moment.tzinfo is not None:
        return moment
    return moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class FileSeen:
    path: str
    size_bytes: int
    mtime_ns: int


def path_key(path: str, mtime_ns: int) -> str:
    """Row key for a file whose content is not hashed (too large to read): path and mtime, not content."""
    return hashlib.sha256(os.fsencode(path) + f"\0{mtime_ns}".encode()).hexdigest()


def find_unchanged(session: Session, files: Sequence[FileSeen]) -> dict[str, int | None]:
    """Paths already registered with the same size and mtime -> their image id (no hashing needed).

    Only a path registered under its content's hash counts: a row keyed by path
    (content never read) or superseded is looked at again, since ``chmod`` does not
    change mtime and a file that could not be read before may be readable now.
    """
    if not files:
        return {}
    by_path = {to_db(f.path): f for f in files}
    rows = session.execute(
        select(
            SourceFile.path, SourceFile.size_bytes, SourceFile.mtime_ns, Image.id, Image.sha256, Image.status
        )
        .join(Image, Image.id == SourceFile.image_id)
        .where(SourceFile.path.in_(list(by_path)))
    )
    unchanged = {}
    for path, size, mtime_ns, image_id, sha256, status in rows:
        seen = by_path[path]
        if (size, mtime_ns) != (seen.size_bytes, seen.mtime_ns) or status == ImageStatus.SUPERSEDED:
            continue
        if sha256 != path_key(seen.path, seen.mtime_ns):
            unchanged[seen.path] = image_id
    return unchanged


#: Why an image is superseded when its last path shows other content (or none).
REPLACED_REASON = (
    "the file was replaced or was still being written: this content is no longer at any known path"
)
GONE_REASON = "file no longer exists at any known path"


def register(session: Session, seen: FileSeen, sha256: str) -> tuple[int, bool]:
    """Record ``seen`` with its content hash. Returns (image id, whether the content needs work anew).

    The content that ``seen.path`` showed before (a replaced file, or a half-written one
    registered early) is superseded once no path shows it any more; content seen again
    after it was superseded is queued again.
    """
    return register_many(session, [(seen, sha256)])[0]


def register_many(session: Session, found: Sequence[tuple[FileSeen, str]]) -> list[tuple[int, bool]]:
    """:func:`register` for many files (distinct paths) with their content hashes, in a handful of
    statements whatever their number (a scan registers 256 files at a time; one file at a time that
    was four round trips each). Returns (image id, needs work anew) per file, in order: of several
    files with the same content only the first can be new, as when they are registered one by one.
    """
    if not found:
        return []
    insert, now = dialect_insert(session), utcnow()
    stored = [to_db(seen.path) for seen, _ in found]
    previous = dict(
        session.execute(select(_sources.c.path, _sources.c.image_id).where(_sources.c.path.in_(stored))).all()
    )
    first_of: dict[str, int] = {}
    for index, (_, sha256) in enumerate(found):
        first_of.setdefault(sha256, index)
    rules = load_rules(session)  # read per batch: a site added while a worker runs applies at once
    created = _insert_new_content(session, insert, found, first_of, now, rules)
    ids = created | _ids_of(session, [sha256 for sha256 in first_of if sha256 not in created])
    _upsert_paths(session, insert, found, stored, ids, now)
    for old in {previous[p] for p in stored if p in previous} - set(ids.values()):
        supersede_if_orphaned(session, old)  # what the paths showed before, if no path shows it now
    revived = {ids[sha256] for sha256 in first_of if sha256 not in created and _revive(session, ids[sha256])}
    return [
        (ids[sha256], first_of[sha256] == index and (sha256 in created or ids[sha256] in revived))
        for index, (_, sha256) in enumerate(found)
    ]


def _insert_new_content(
    session: Session, insert, found, first_of: dict[str, int], now, rules: SiteRules
) -> dict[str, int]:
    """Image rows for content not seen before, queued, each with the site of the path it came
    under; returns {sha256: id} of those created."""
    rows = [
        {
            "sha256": sha256,
            "status": ImageStatus.QUEUED,
            "size_bytes": found[index][0].size_bytes,
            "attempts": 0,
            "out_of_scope": False,
            "first_seen_at": now,
            "updated_at": now,
            "site": rules.site_of(found[index][0].path),
        }
        for sha256, index in first_of.items()
    ]
    statement = (
        insert(_images)
        .on_conflict_do_nothing(index_elements=["sha256"])
        .returning(_images.c.sha256, _images.c.id)
    )
    return dict(session.execute(statement, rows).all())


def _ids_of(session: Session, hashes: list[str]) -> dict[str, int]:
    if not hashes:
        return {}
    query = select(_images.c.sha256, _images.c.id).where(_images.c.sha256.in_(hashes))
    return dict(session.execute(query).all())


def _upsert_paths(session: Session, insert, found, stored: list[str], ids: dict[str, int], now) -> None:
    """Each path now shows its content (a path seen before moves to the content it shows now)."""
    rows = [
        {
            "path": path,
            "image_id": ids[sha256],
            "size_bytes": seen.size_bytes,
            "mtime_ns": seen.mtime_ns,
            "seen_at": now,
        }
        for path, (seen, sha256) in zip(stored, found, strict=True)
    ]
    statement = insert(_sources)
    changed = {name: statement.excluded[name] for name in ("image_id", "size_bytes", "mtime_ns", "seen_at")}
    session.execute(statement.on_conflict_do_update(index_elements=["path"], set_=changed), rows)


def supersede_if_orphaned(session: Session, image_id: int, reason: str = REPLACED_REASON) -> bool:
    """Mark ``image_id`` superseded if no path shows its content any more (whatever its state)."""
    now = utcnow()
    result = session.execute(
        update(Image)
        .where(
            Image.id == image_id,
            Image.status != ImageStatus.SUPERSEDED,
            ~select(SourceFile.id).where(SourceFile.image_id == image_id).exists(),
        )
        .values(
            status=ImageStatus.SUPERSEDED,
            reason=reason,
            finished_at=func.coalesce(Image.finished_at, now),
            updated_at=now,
            **_UNLEASED,
        )
    )
    return result.rowcount == 1


def _revive(session: Session, image_id: int) -> bool:
    """Superseded content that a path shows again is queued again (its old score, if any, is kept)."""
    now = utcnow()
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.status == ImageStatus.SUPERSEDED)
        .values(status=ImageStatus.QUEUED, reason=None, attempts=0, finished_at=None, updated_at=now)
    )
    return result.rowcount == 1


def record_gone(session: Session, image_id: int) -> bool:
    """The claimed image's content is at no known path (deleted or replaced): superseded, not failed."""
    return _finish(session, image_id, ImageStatus.SUPERSEDED, reason=GONE_REASON)


def prune_missing_paths(
    session: Session, image_id: int, seen_path: str, exists: Callable[[str], bool]
) -> int:
    """Forget the other paths of ``image_id`` that no longer exist (a renamed file's old name).

    ``seen_path`` was just seen, so the image keeps at least one path. ``exists`` is
    asked about the file-system name of each stored path.
    """
    keep = to_db(seen_path)
    stale = [
        row_id
        for row_id, stored in session.execute(
            select(SourceFile.id, SourceFile.path).where(
                SourceFile.image_id == image_id, SourceFile.path != keep
            )
        )
        if not exists(from_db_one(stored))
    ]
    if stale:
        session.execute(delete(SourceFile).where(SourceFile.id.in_(stale)))
    return len(stale)


def pending_ids(session: Session, image_ids: Iterable[int], owner: str | None = None) -> list[int]:
    """Those of ``image_ids`` that still need work (queued, or processing with a lease that ran out
    or that ``owner`` holds)."""
    ids = list(image_ids)
    if not ids:
        return []
    now = utcnow()
    return list(
        session.scalars(select(Image.id).where(Image.id.in_(ids), _claimable(now, owner)).order_by(Image.id))
    )


def db_now(session: Session) -> datetime:
    """The database's clock (PostgreSQL ``now()``): leases mean the same on every machine.

    SQLite lives on one machine, whose clock is the database's.
    """
    if session.get_bind().dialect.name == "postgresql":
        return as_utc(session.scalar(select(func.now())))
    return utcnow()


def _claimable(now: datetime, owner: str | None = None):
    lease_gone = Image.lease_expires_at < now
    if owner is not None:
        lease_gone = or_(lease_gone, Image.lease_owner == owner)
    return or_(Image.status == ImageStatus.QUEUED, and_(Image.status == ImageStatus.PROCESSING, lease_gone))


def claim(
    session: Session, image_ids: Sequence[int], lease_seconds: float, owner: str | None = None
) -> tuple[list[int], list[int]]:
    """Take ``image_ids`` for processing. Returns (claimed ids, ids failed for too many attempts).

    A claim does not count an attempt: ``attempts`` counts real deaths of the process
    that held the lease (:func:`release_dead_owners`, :func:`requeue_expired`), so a
    database outage or a retried task never looks like a file that kills its worker.
    An image whose worker died :data:`MAX_ATTEMPTS` times is failed. The lease is
    measured on the database's clock.
    """
    if not image_ids:
        return [], []
    now = db_now(session)
    exhausted = list(
        session.scalars(
            update(Image)
            .where(Image.id.in_(image_ids), _claimable(now, owner), Image.attempts >= MAX_ATTEMPTS)
            .values(
                status=ImageStatus.FAILED,
                finished_at=now,
                updated_at=now,
                lease_expires_at=None,
                reason=f"processing was interrupted {MAX_ATTEMPTS} times (the worker died each time); "
                "not retried",
            )
            .returning(Image.id)
        )
    )
    claimed = list(
        session.scalars(
            update(Image)
            .where(Image.id.in_(image_ids), _claimable(now, owner))
            .values(
                status=ImageStatus.PROCESSING,
                lease_owner=owner,
                updated_at=now,
                lease_expires_at=now + timedelta(seconds=lease_seconds),
            )
            .returning(Image.id)
        )
    )
    return sorted(claimed), exhausted


def attempts_of(session: Session, image_ids: Sequence[int]) -> dict[int, int]:
    return dict(session.execute(select(Image.id, Image.attempts).where(Image.id.in_(image_ids))).all())


def source_paths(session: Session, image_ids: Sequence[int]) -> dict[int, list[str]]:
    paths: dict[int, list[str]] = {}
    rows = session.execute(
        select(SourceFile.image_id, SourceFile.path)
        .where(SourceFile.image_id.in_(image_ids))
        .order_by(SourceFile.id)
    )
    for image_id, path in rows:
        paths.setdefault(image_id, []).append(path)
    return paths


@dataclass(frozen=True)
class ScoreRecord:
    model_version: str
    pneumonia_probability: float
    pneumonia_logit: float
    viral_probability: float | None
    screening_threshold: float
    high_confidence_threshold: float


def _finished(status: ImageStatus, now: datetime, **values) -> dict:
    """The column values of an image moved to the final ``status`` at ``now``."""
    return {"status": status, "finished_at": now, "updated_at": now, "lease_expires_at": None, **values}


def _unfinished(image_id):
    """The image ``image_id`` while it is not final. The final states are bound one by one (not as
    an expanding list), which an executemany (:func:`record_scores`) requires."""
    final = [literal(s.value, _images.c.status.type) for s in FINAL_STATUSES]
    return and_(_images.c.id == image_id, _images.c.status.not_in(final))


def _finish(session: Session, image_id: int, status: ImageStatus, **values) -> bool:
    """Move an unfinished image to a final state; False if it was already final."""
    result = session.execute(
        update(_images).where(_unfinished(image_id)).values(_finished(status, utcnow(), **values))
    )
    return result.rowcount == 1


def _score_row(image_id: int, score: ScoreRecord, now: datetime) -> dict:
    p = score.pneumonia_probability
    return {
        "image_id": image_id,
        "model_version": score.model_version,
        "pneumonia_probability": p,
        "pneumonia_logit": score.pneumonia_logit,
        "viral_probability": score.viral_probability,
        "screening_threshold": score.screening_threshold,
        "high_confidence_threshold": score.high_confidence_threshold,
        "screening_positive": p >= score.screening_threshold,
        "high_confidence_positive": p >= score.high_confidence_threshold,
        "created_at": now,
    }


def _insert_scores(session: Session, rows: list[dict]) -> None:
    """Scores once per (image, model version), whatever the images' states: a row already there stays."""
    insert = dialect_insert(session)
    statement = insert(_scores).on_conflict_do_nothing(index_elements=["image_id", "model_version"])
    session.execute(statement, rows)


def add_score(session: Session, image_id: int, score: ScoreRecord) -> None:
    """Write a score once per (image, model version), whatever the image's state. Idempotent."""
    _insert_scores(session, [_score_row(image_id, score, utcnow())])


def record_score(session: Session, image_id: int, score: ScoreRecord, attributes: dict | None = None) -> bool:
    """Write a score once per (image, model version) and mark the image scored. Idempotent."""
    add_score(session, image_id, score)
    return _finish(session, image_id, ImageStatus.SCORED, reason=None, **to_columns(attributes))


#: Why a film is not ranked: the same SOP instance was scored before (PS3.3 C.12.1.1.1: the SOP Instance
#: UID identifies the instance; a PACS keeps the first copy and treats the later one as a duplicate).
DUPLICATE_REASON = (
    "duplicate of film {first}: the same DICOM instance (SOP Instance UID) received again, perhaps in "
    "another transfer syntax; the first copy is the one ranked and reported"
)


def record_scores(session: Session, scored: Sequence[tuple[int, ScoreRecord, dict | None]]) -> list[int]:
    """:func:`record_score` for a batch of (image id, score, attributes): one multi-row insert of the
    scores and one executemany update per set of attribute columns, instead of two statements per
    film (a batch of 32 films: 2-3 round trips to the database instead of 64).

    A film whose SOP Instance UID is already that of a scored film (or of an earlier film of the
    batch) is a later copy of the same instance: it is rejected as a duplicate, not ranked twice.
    Returns the ids of those duplicates.
    """
    if not scored:
        return []
    now = utcnow()
    _insert_scores(session, [_score_row(image_id, score, now) for image_id, score, _ in scored])
    duplicates = _duplicates(session, scored)
    by_columns: dict[tuple[str, ...], list[dict]] = {}
    for image_id, _, attributes in scored:
        if image_id in duplicates:
            reason = DUPLICATE_REASON.format(first=duplicates[image_id][:12])
            _finish(session, image_id, ImageStatus.REJECTED, reason=reason, **to_columns(attributes))
            continue
        values = _finished(ImageStatus.SCORED, now, reason=None, **to_columns(attributes))
        by_columns.setdefault(tuple(sorted(values)), []).append(
            {"_id": image_id, **{f"_{k}": v for k, v in values.items()}}
        )
    for columns, rows in by_columns.items():
        statement = update(_images).where(_unfinished(bindparam("_id")))
        session.execute(statement.values({name: bindparam(f"_{name}") for name in columns}), rows)
    return sorted(duplicates)


def _duplicates(session: Session, scored: Sequence[tuple[int, ScoreRecord, dict | None]]) -> dict[int, str]:
    """{image id: SHA-256 of the first copy} for the films of ``scored`` that repeat a SOP instance."""
    batch: dict[str, list[int]] = {}
    for image_id, _, attributes in scored:
        uid = to_columns({"sop_uid": (attributes or {}).get("sop_uid")}).get("sop_uid")
        if uid:
            batch.setdefault(uid, []).append(image_id)
    if not batch:
        return {}
    ids = [i for group in batch.values() for i in group]
    earlier = session.execute(
        select(_images.c.sop_uid, _images.c.id, _images.c.sha256)
        .where(
            _images.c.sop_uid.in_(list(batch)),
            _images.c.status == ImageStatus.SCORED,
            _images.c.id.not_in(ids),
        )
        .order_by(_images.c.id)
    ).all()
    first: dict[str, int] = {}
    sha_of = dict(session.execute(select(_images.c.id, _images.c.sha256).where(_images.c.id.in_(ids))).all())
    for uid, image_id, sha256 in earlier:
        first.setdefault(uid, image_id)
        sha_of[image_id] = sha256
    found = {}
    for uid, group in batch.items():
        keep = first.get(uid, min(group))
        found.update({image_id: sha_of[keep] for image_id in group if image_id != keep})
    return found


def record_problem(
    session: Session, image_id: int, status: ImageStatus, reason: str, attributes: dict | None = None
) -> bool:
    """Move an image to a final problem state; the reason is stored without any file path in it."""
    stored = scrub_reason(reason, source_paths(session, [image_id]).get(image_id, []))
    return _finish(session, image_id, status, reason=stored, **to_columns(attributes))


#: A quoted path ('/drop/x.png', "C:\\x", PosixPath('x/y')) or a bare absolute one (/drop/x.png).
_QUOTED_PATH = re.compile(r"""(['"])(?:[A-Za-z]:\\|~?/|\.\.?/)[^'"\n]*\1""")
_BARE_PATH = re.compile(r"""(?<![\w.:/\\-])/[^\s'"]+""")
MAX_REASON_CHARS = 2000


def _trailing_punctuation(path: str) -> str:
    return path[len(path.rstrip(".,:;)]")) :]


def scrub_reason(reason: str, paths: Iterable[str] = ()) -> str:
    """``reason`` with file paths (and the file's own names) taken out: paths identify patients.

    A backstop: pipeline messages should not carry paths in the first place, but a
    library's message (Pillow's "cannot identify image file '/drop/DOE_JOHN.png'") can.
    """
    text = clean_text(reason)
    for stored in paths:
        for form in {stored, *from_db(stored)}:
            text = text.replace(form, "<file>")
            name = os.path.basename(form)
            if len(name) >= 6 and not name.isalpha():  # "DICOM" or "image" may be words of the reason
                text = text.replace(name, "<file>")
    text = _QUOTED_PATH.sub("<file>", text)
    text = _BARE_PATH.sub(lambda found: "<file>" + _trailing_punctuation(found.group()), text)
    return text[:MAX_REASON_CHARS]


def release(session: Session, image_ids: Sequence[int]) -> None:
    """Put claimed images back in the queue (file still being written or briefly unreadable, an error
    that is not the worker's death, shutdown): no attempt is counted."""
    if not image_ids:
        return
    session.execute(
        update(Image)
        .where(Image.id.in_(image_ids), Image.status == ImageStatus.PROCESSING)
        .values(status=ImageStatus.QUEUED, updated_at=utcnow(), **_UNLEASED)
    )


def _requeue_after_death(session: Session, condition) -> list[int]:
    """Processing images matching ``condition`` lost their worker: back to queued, one attempt counted."""
    return list(
        session.scalars(
            update(Image)
            .where(Image.status == ImageStatus.PROCESSING, condition)
            .values(
                status=ImageStatus.QUEUED,
                attempts=Image.attempts + 1,
                updated_at=utcnow(),
                **_UNLEASED,
            )
            .returning(Image.id)
        )
    )


def release_dead_owners(session: Session, prefix: str, is_dead: Callable[[str], bool]) -> list[int]:
    """Requeue images leased by owners under ``prefix`` that are gone (a process of this host, a
    supervisor's dead child); each counts one attempt (a real death)."""
    rows = session.execute(
        select(Image.id, Image.lease_owner).where(
            Image.status == ImageStatus.PROCESSING, Image.lease_owner.startswith(prefix, autoescape=True)
        )
    ).all()
    dead = [image_id for image_id, owner in rows if is_dead(owner)]
    if not dead:
        return []
    return sorted(_requeue_after_death(session, Image.id.in_(dead)))


def requeue_expired(session: Session) -> list[int]:
    """Images whose lease ran out on the database's clock (the machine vanished) go back to queued;
    the backstop behind :func:`release_dead_owners`."""
    return sorted(_requeue_after_death(session, Image.lease_expires_at < db_now(session)))


# -- what was sent to the broker -------------------------------------------------------------------


def mark_sent(session: Session, image_ids: Sequence[int]) -> None:
    """Record that a message for ``image_ids`` is now in the broker."""
    if image_ids:
        session.execute(update(Image).where(Image.id.in_(image_ids)).values(sent_at=db_now(session)))


def never_sent(session: Session, image_ids: Sequence[int]) -> list[int]:
    """Those of ``image_ids`` still queued that no message was ever sent for (or that were released
    since: :func:`release` and the requeues clear nothing here, they are sent by their caller)."""
    if not image_ids:
        return []
    return sorted(
        session.scalars(
            select(Image.id).where(
                Image.id.in_(image_ids), Image.status == ImageStatus.QUEUED, Image.sent_at.is_(None)
            )
        )
    )


def lost_ids(session: Session, sent_before: datetime, limit: int = 10_000) -> list[int]:
    """Queued images whose message went out before ``sent_before`` (or never went out) and were not
    touched since. Callers use this only when the broker's queue is empty, i.e. the message is lost."""
    query = select(Image.id).where(
        Image.status == ImageStatus.QUEUED,
        or_(Image.sent_at.is_(None), Image.sent_at < sent_before),
        Image.updated_at < sent_before,
    )
    return list(session.scalars(query.order_by(Image.id).limit(limit)))


def requeue_by_status(session: Session, status: ImageStatus, reason_contains: str | None = None) -> list[int]:
    """An operator puts final images back (``cxr-triage requeue``): queued, no attempts, unsent."""
    condition = Image.status == status
    if reason_contains:
        condition = and_(condition, Image.reason.contains(reason_contains, autoescape=True))
    return sorted(
        session.scalars(
            update(Image)
            .where(condition)
            .values(
                status=ImageStatus.QUEUED,
                reason=None,
                attempts=0,
                sent_at=None,
                finished_at=None,
                updated_at=utcnow(),
                **_UNLEASED,
            )
            .returning(Image.id)
        )
    )


def _outdated(model_version: str):
    has_current = select(Score.id).where(Score.image_id == Image.id, Score.model_version == model_version)
    return and_(Image.status == ImageStatus.SCORED, ~has_current.exists())


def outdated_ids(session: Session, model_version: str, limit: int) -> list[int]:
    """Scored images with no score from ``model_version`` yet (to re-score after a model change)."""
    query = select(Image.id).where(_outdated(model_version))
    return list(session.scalars(query.order_by(Image.id).limit(limit)))


def image_ids_at(session: Session, paths: Iterable[str]) -> list[int]:
    """Images registered under ``paths`` (file-system paths)."""
    stored = [to_db(path) for path in paths]
    if not stored:
        return []
    query = select(SourceFile.image_id).where(SourceFile.path.in_(stored), SourceFile.image_id.is_not(None))
    return sorted(set(session.scalars(query)))


def outdated_ids_among(session: Session, model_version: str, image_ids: Iterable[int]) -> list[int]:
    ids = list(image_ids)
    if not ids:
        return []
    query = select(Image.id).where(Image.id.in_(ids), _outdated(model_version))
    return list(session.scalars(query.order_by(Image.id)))


def queued_ids(session: Session, limit: int = 10_000, older_than: datetime | None = None) -> list[int]:
    query = select(Image.id).where(Image.status == ImageStatus.QUEUED)
    if older_than is not None:
        query = query.where(Image.updated_at < older_than)
    return list(session.scalars(query.order_by(Image.id).limit(limit)))


def status_counts(session: Session, image_ids: Sequence[int] | None = None) -> dict[str, int]:
    query = select(Image.status, func.count()).group_by(Image.status)
    if image_ids is not None:
        query = query.where(Image.id.in_(image_ids))
    return {status: count for status, count in session.execute(query)}


class AmbiguousReference(ValueError):
    """A SHA-256 prefix that matches more than one film."""


#: Shortest SHA-256 prefix ``review`` accepts: 8 hex digits (4 billion values).
MIN_PREFIX_CHARS = 8
_HEX_REFERENCE = re.compile(rf"[0-9a-f]{{{MIN_PREFIX_CHARS},64}}")


def find_by_sha256(session: Session, reference: str) -> int | None:
    """The image whose SHA-256 is ``reference`` or starts with it (a unique prefix of >= 8 hex digits).

    Raises ValueError for anything that is not hex (``%`` and ``_`` are not wildcards
    here), and :class:`AmbiguousReference` when the prefix names several films.
    """
    prefix = reference.strip().lower()
    if not _HEX_REFERENCE.fullmatch(prefix):
        raise ValueError(
            f"give the film's SHA-256 or at least {MIN_PREFIX_CHARS} of its leading hex digits (0-9, a-f)"
        )
    matches = list(
        session.scalars(select(Image.id).where(Image.sha256.startswith(prefix, autoescape=True)).limit(2))
    )
    if len(matches) > 1:
        count = session.scalar(
            select(func.count()).select_from(Image).where(Image.sha256.startswith(prefix, autoescape=True))
        )
        raise AmbiguousReference(f"{count} films start with {prefix}; give more digits of the SHA-256")
    return matches[0] if matches else None


def mark_reviewed(session: Session, reference: str, reviewer: str | None) -> int:
    """Mark one film reviewed. Returns 1, or 0 when no film matches or it was already reviewed."""
    image_id = find_by_sha256(session, reference)
    if image_id is None:
        return 0
    result = session.execute(
        update(Image)
        .where(Image.id == image_id, Image.reviewed_at.is_(None))
        .values(reviewed_at=utcnow(), reviewed_by=reviewer)
    )
    return result.rowcount
