"""The triage worklist: what a radiologist should read first.

The list is the database view ``triage_worklist`` (migration 0004), so ``psql``, a BI tool, the
CLI, the JSON API and the web page all read the same rows in the same order::

    SELECT * FROM triage_worklist ORDER BY worklist_rank LIMIT 20;

Ordering (the aging rule, also in the README), ascending ``worklist_rank``:

1. Unreviewed scored films, by ``priority`` (highest first), where

       priority = 100 x P(pneumonia)
                + 100 if P >= the screening threshold
                + 100 more if P >= the high-confidence threshold
                + AGING_POINTS_PER_DAY (10) x days since the file arrived

   so likely pneumonia comes first, and a film below the threshold gains 10
   points a day: it cannot sink forever (after ~10 days it reaches the
   screening-positive tier, after ~20 days the high-confidence tier). Since every
   film ages at the same rate, the order does not depend on the clock:
   ``worklist_rank = 10 x days-since-1970(arrival) - (priority without aging)``.
2. Films that could not be scored (failed, rejected): a person must look at
   them by hand; newest first (rank 1,000,000 and up).
3. Films still in progress (queued, processing): oldest first (2,000,000 and up).
4. Reviewed films, most recently reviewed first (3,000,000 and up).
5. ``superseded`` films (content replaced or gone): only in ``triage_worklist_all``.

Thresholds, tiers and priority follow the *active* calibration of the score's model version when
there is one (``calibrations.active``); otherwise the thresholds stored with the score
(``calibration`` = ``shipped``). The score shown is each film's newest score; ``path`` is the
path the content was most recently seen at; ties in rank are broken by ``sha256``.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, fields
from datetime import date, datetime, time, timedelta

from sqlalchemy import Boolean, Date, DateTime, Float, String, Text, column, func, select, table
from sqlalchemy.orm import Session

from db.queue import as_utc
from db.schema import Image, ImageStatus, SourceFile

AGING_POINTS_PER_DAY = 10.0
SCREENING_BONUS = 100.0
HIGH_CONFIDENCE_BONUS = 100.0

VIEW = "triage_worklist"
VIEW_WITH_SUPERSEDED = "triage_worklist_all"

INTENDED_USE = (
    "Research triage aid, not a diagnostic device. Validated on paediatric (1-5 years) "
    "anterior-posterior chest films from one hospital; every film still needs a radiologist's read."
)

TIERS = ("HIGH", "screen+", "below")
#: How long a film of each tier should wait at most (its waited time shows red after it).
WAIT_TARGET_S = {"HIGH": 3600, "screen+": 4 * 3600, "below": 24 * 3600}


def waited(row: dict, now: datetime) -> tuple[str, bool]:
    """How long a worklist row's film has waited (``42 min``, ``3.5 h``, ``4 d``) and whether that is
    past its tier's target (never for reviewed films or films without a tier)."""
    arrived = datetime.fromisoformat(row["first_seen_at"])
    seconds = max((now - arrived).total_seconds(), 0.0)
    if seconds < 3600:
        label = f"{int(seconds // 60)} min"
    elif seconds < 48 * 3600:
        label = f"{seconds / 3600:.1f} h"
    else:
        label = f"{seconds / 86400:.0f} d"
    late = not row["reviewed_at"] and row["tier"] is not None and seconds > WAIT_TARGET_S[row["tier"]]
    return label, late


#: The view's columns in order, with the types their values are read back as.
_COLUMNS = (
    ("path", Text),
    ("paths", Text),
    ("sha256", String),
    ("status", String),
    ("reason", Text),
    ("score", Float),
    ("threshold", Float),
    ("high_confidence_threshold", Float),
    ("screening_positive", Boolean),
    ("high_confidence", Boolean),
    ("viral_probability", Float),
    ("priority", Float),
    ("model_version", String),
    ("out_of_scope", Boolean),
    ("scope_note", Text),
    ("study_uid", String),
    ("sop_uid", String),
    ("accession_number", String),
    ("study_date", Date),
    ("source_format", String),
    ("first_seen_at", DateTime(timezone=True)),
    ("reviewed_at", DateTime(timezone=True)),
    ("calibration", String),
    ("tier", String),
    ("patient_id", String),
    ("patient_name", String),
    ("patient_age_years", Float),
    ("modality", String),
    ("view_position", String),
    ("reviewed_by", String),
    ("site", String),
    ("worklist_rank", Float),
)
COLUMNS = tuple(name for name, _ in _COLUMNS)


def view_table(include_superseded: bool = False):
    """The worklist view as a selectable (lightweight table clause with typed columns)."""
    name = VIEW_WITH_SUPERSEDED if include_superseded else VIEW
    return table(name, *(column(n, t) for n, t in _COLUMNS))


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
    #: DICOM Study Date as ISO ``YYYY-MM-DD`` (None: not DICOM, or no valid date in the header).
    study_date: str | None
    source_format: str | None
    first_seen_at: str
    reviewed_at: str | None
    calibration: str | None
    tier: str | None
    patient_id: str | None
    patient_name: str | None
    patient_age_years: float | None
    modality: str | None
    view_position: str | None
    reviewed_by: str | None
    #: The site the film came from (db/sites.py); its thresholds are that site's calibration.
    site: str
    worklist_rank: float

    def as_dict(self) -> dict:
        return asdict(self)


assert tuple(f.name for f in fields(WorklistEntry)) == COLUMNS


#: Filter days outside this range are refused (a day after the last would overflow the date type).
FIRST_DAY, LAST_DAY = date(1800, 1, 1), date(9998, 12, 31)
MAX_FILTER_TEXT = 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class WorklistFilter:
    """What a reader narrowed the list to; every field is applied in SQL, and None (the default) does
    not narrow. ``folder``: films seen under that folder at any of their paths; the two day ranges
    (``arrived_*`` on the first sighting, ``study_date_*`` on DICOM Study Date) include both ends;
    ``search``: an exact patient ID or accession number; ``site``: films of that site.
    """

    status: str | None = None
    tier: str | None = None
    reviewed: bool | None = None
    out_of_scope: bool | None = None
    folder: str | None = None
    arrived_from: date | None = None
    arrived_to: date | None = None
    study_date_from: date | None = None
    study_date_to: date | None = None
    search: str | None = None
    site: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in {s.value for s in ImageStatus}:
            raise ValueError(f"unknown status {self.status!r}")
        if self.tier is not None and self.tier not in TIERS:
            raise ValueError(f"unknown tier {self.tier!r}")
        for name in ("arrived_from", "arrived_to", "study_date_from", "study_date_to"):
            day = getattr(self, name)
            if day is not None and not FIRST_DAY <= day <= LAST_DAY:
                raise ValueError(f"{name} must be between {FIRST_DAY} and {LAST_DAY}")
        for name in ("folder", "search"):
            text = getattr(self, name)
            # The value is never quoted back: a search is a patient ID or an accession number.
            if text is not None and (len(text) > MAX_FILTER_TEXT or _CONTROL.search(text)):
                raise ValueError(f"{name}: at most {MAX_FILTER_TEXT} characters, no control characters")


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _filtered(query, view, wanted: WorklistFilter):
    c = view.c
    if wanted.status:
        query = query.where(c.status == wanted.status)
    if wanted.tier:
        query = query.where(c.tier == wanted.tier)
    if wanted.site:
        query = query.where(c.site == wanted.site)
    if wanted.reviewed is not None:
        query = query.where(_reviewed(view, wanted.reviewed, _include_superseded(wanted)))
    if wanted.out_of_scope is not None:
        query = query.where(c.out_of_scope == wanted.out_of_scope)
    if wanted.folder:
        # Films seen under the folder (at any of their paths): a prefix range on source_files.path.
        prefix = wanted.folder.rstrip("/") + "/"
        seen_there = (
            select(Image.sha256)
            .join(SourceFile, SourceFile.image_id == Image.id)
            .where(SourceFile.path.like(_escape_like(prefix) + "%", escape="\\"))
        )
        query = query.where(c.sha256.in_(seen_there))
    if wanted.arrived_from:
        query = query.where(c.first_seen_at >= datetime.combine(wanted.arrived_from, time.min))
    if wanted.arrived_to:
        day_after = datetime.combine(wanted.arrived_to + timedelta(days=1), time.min)
        query = query.where(c.first_seen_at < day_after)
    # Inclusive days (ix_images_study_date); films without a study date are outside every range.
    if wanted.study_date_from:
        query = query.where(c.study_date >= wanted.study_date_from)
    if wanted.study_date_to:
        query = query.where(c.study_date <= wanted.study_date_to)
    if wanted.search:
        term = wanted.search.strip()
        query = query.where((c.patient_id == term) | (c.accession_number == term))
    return query


#: Reviewed films rank from here (below: unreviewed), superseded ones from SUPERSEDED_RANK.
REVIEWED_RANK = 3_000_000.0
SUPERSEDED_RANK = 4_000_000.0


def _reviewed(view, reviewed: bool, with_superseded: bool):
    """Reviewed or not, as a range of ``worklist_rank`` (an index range, no join to the images)."""
    rank = view.c.worklist_rank
    in_range = (rank >= REVIEWED_RANK) & (rank < SUPERSEDED_RANK) if reviewed else rank < REVIEWED_RANK
    if not with_superseded:
        return in_range
    superseded = (rank >= SUPERSEDED_RANK) & (
        view.c.reviewed_at.is_not(None) if reviewed else view.c.reviewed_at.is_(None)
    )
    return in_range | superseded


def _include_superseded(wanted: WorklistFilter) -> bool:
    return wanted.status == ImageStatus.SUPERSEDED


def query_rows(
    session: Session, wanted: WorklistFilter | None = None, limit: int | None = None, offset: int = 0
) -> list[dict]:
    """Rows of the worklist (JSON-ready dicts in :data:`COLUMNS` order), most urgent first."""
    wanted = wanted or WorklistFilter()
    view = view_table(_include_superseded(wanted))
    order = (view.c.worklist_rank, view.c.sha256)
    query = _filtered(select(view), view, wanted).order_by(*order)
    if offset:
        # Deep pages: find the page's films by their keys first (cheap columns only), then compute the
        # full rows (paths, priority) for those films alone, not for every film skipped by OFFSET.
        keys = _filtered(select(view.c.sha256), view, wanted).order_by(*order).offset(offset)
        if limit is not None:
            keys = keys.limit(limit)
        page = keys.subquery("page")
        query = select(view).join(page, page.c.sha256 == view.c.sha256).order_by(*order)
    elif limit is not None:
        query = query.limit(limit)
    return [row_to_dict(row) for row in session.execute(query).mappings()]


def count_rows(session: Session, wanted: WorklistFilter | None = None) -> int:
    wanted = wanted or WorklistFilter()
    view = view_table(_include_superseded(wanted))
    return session.scalar(_filtered(select(func.count()).select_from(view), view, wanted)) or 0


def film(session: Session, sha256: str) -> dict | None:
    """One film's worklist row (superseded films included), or None."""
    view = view_table(include_superseded=True)
    row = session.execute(select(view).where(view.c.sha256 == sha256)).mappings().first()
    return row_to_dict(row) if row is not None else None


def _iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat() if moment is not None else None


def _flag(value) -> bool | None:
    return None if value is None else bool(value)


def row_to_dict(row) -> dict:
    """A view row as the JSON the CLI prints: booleans, ISO-8601 times and days, ``paths`` as a list."""
    out = {name: row[name] for name in COLUMNS}
    out["paths"] = json.loads(out["paths"]) if out["paths"] else []
    for name in ("screening_positive", "high_confidence", "out_of_scope"):
        out[name] = _flag(out[name])
    out["out_of_scope"] = bool(out["out_of_scope"])
    for name in ("first_seen_at", "reviewed_at"):
        out[name] = _iso(out[name])
    out["study_date"] = out["study_date"].isoformat() if out["study_date"] is not None else None
    out["worklist_rank"] = float(out["worklist_rank"])
    return out


def build_worklist(
    session: Session, status: str | None = None, limit: int | None = None
) -> list[WorklistEntry]:
    """The worklist as typed entries (the CLI's and the tests' entry point)."""
    rows = query_rows(session, WorklistFilter(status=status), limit=limit)
    return [WorklistEntry(**row) for row in rows]
