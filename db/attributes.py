"""Header values that become columns of ``images``: the one place that maps them.

The pipeline reads a DICOM header into ``pipeline.decode.DicomAttributes``; this table
says which of those values are stored, in which column, and how they are made safe
to store:

* text is cut to its column's length: PostgreSQL refuses a longer value with
  ``DataError`` (SQLite silently keeps it), and one over-long View Position
  (PS3.3 C.8.11.5, a CS of at most 16 characters per PS3.5 6.2) must not fail a
  good film. A UID longer than its column is not a UID (PS3.5 9.1 allows 64
  characters) and is not stored at all: a cut UID could name another study.
* NUL characters (refused in PostgreSQL text) and unpaired surrogates (bytes that
  did not decode in the header's character set, PS3.5 6.1) are replaced;
* numbers must be finite;
* dates must be real days (a ``date``, or ISO ``YYYY-MM-DD`` text); anything else is not stored.

Adding a DICOM field therefore touches this table, the ``images`` column in
``db/schema.py`` (with its migration) and the line in the pipeline that reads it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime

from sqlalchemy import Boolean, Date, Float

from db.schema import Image
from db.utf8 import is_utf8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Attribute:
    #: Name on ``DicomAttributes`` and column of ``images`` (the same on purpose).
    name: str
    #: DICOM keyword it is read from (PS3.6 data dictionary); None for derived values.
    keyword: str | None
    #: True for identifiers that must be stored whole or not at all (UIDs).
    whole_or_nothing: bool = False


#: DICOM attributes stored with each image (identifiers: shown in the worklist, never logged).
DICOM_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("study_uid", "StudyInstanceUID", whole_or_nothing=True),
    Attribute("series_uid", "SeriesInstanceUID", whole_or_nothing=True),
    Attribute("sop_uid", "SOPInstanceUID", whole_or_nothing=True),
    Attribute("accession_number", "AccessionNumber"),
    Attribute("patient_id", "PatientID"),
    Attribute("patient_name", "PatientName"),
    Attribute("patient_age_years", "PatientAge"),
    Attribute("modality", "Modality"),
    Attribute("view_position", "ViewPosition"),
    Attribute("study_date", "StudyDate"),
)

#: Other per-file values the pipeline reports with an outcome (not read from one DICOM element).
PIPELINE_ATTRIBUTES: tuple[Attribute, ...] = (
    Attribute("source_format", None),
    Attribute("out_of_scope", None),
    Attribute("scope_note", None),
)

_BY_NAME = {attribute.name: attribute for attribute in DICOM_ATTRIBUTES + PIPELINE_ATTRIBUTES}


def from_dicom(attrs: object) -> dict:
    """The stored DICOM attributes of a ``DicomAttributes`` (any object with those names)."""
    return {attribute.name: getattr(attrs, attribute.name, None) for attribute in DICOM_ATTRIBUTES}


def clean_text(value: str) -> str:
    """Text any database accepts: no NUL, no unpaired surrogates."""
    value = value.replace("\x00", "\ufffd")
    return value if is_utf8(value) else value.encode("utf-8", "replace").decode("utf-8")


def _column_type(name: str):
    return Image.__table__.c[name].type


def _stored(attribute: Attribute, value: object) -> object:
    if value is None:
        return None
    kind = _column_type(attribute.name)
    if isinstance(kind, Boolean):
        return bool(value)
    if isinstance(kind, Date):
        return _day(value)
    if isinstance(kind, Float):
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return number if math.isfinite(number) else None
    text = clean_text(str(value)).strip()
    limit = getattr(kind, "length", None)
    if limit is not None and len(text) > limit:
        if attribute.whole_or_nothing:
            log.debug("%s longer than %d characters; not stored", attribute.keyword, limit)
            return None
        log.debug("%s longer than %d characters; cut", attribute.keyword or attribute.name, limit)
        text = text[:limit]
    return text or None


def _day(value: object) -> date | None:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    try:
        return date.fromisoformat(str(value).strip())
    except ValueError:
        return None


def to_columns(values: Mapping[str, object] | None) -> dict:
    """``images`` column values for what the pipeline reported about a file, safe to store.

    Unknown names are dropped (and named at DEBUG): a pipeline that reports a new
    field before it has a column must not fail every film.
    """
    columns: dict = {}
    for name, value in (values or {}).items():
        attribute = _BY_NAME.get(name)
        if attribute is None:
            log.debug("attribute %s has no column; not stored", name)
            continue
        columns[name] = _stored(attribute, value)
    return columns
