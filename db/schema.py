"""Database schema (SQLAlchemy 2.0 typed ORM). Changes go through Alembic migrations.

* ``images``: one row per distinct file content (SHA-256). Its ``status`` walks
  ``queued -> processing -> scored | rejected | failed``, or ends ``superseded`` when no
  known path shows the content any more (replaced, half-written, deleted); ``attempts``
  counts claims so that a file that keeps killing its worker is failed, not retried forever.
  The DICOM attributes among its columns are mapped in ``db/attributes.py``.
* ``source_files``: every path a content was seen under, with size and mtime so a
  backlog rescan can skip known files without hashing them.
* ``scores``: one row per (image, model version): the unique key makes result
  writes idempotent when a task is delivered twice.
"""

from __future__ import annotations

import enum
from datetime import UTC, date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    return datetime.now(UTC)


class ImageStatus(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    SCORED = "scored"
    REJECTED = "rejected"
    FAILED = "failed"
    #: The content at this row's paths was replaced or deleted before it was scored, or is no longer
    #: at any known path: nobody can open it, so it is kept out of the worklist.
    SUPERSEDED = "superseded"


FINAL_STATUSES = frozenset(
    {ImageStatus.SCORED, ImageStatus.REJECTED, ImageStatus.FAILED, ImageStatus.SUPERSEDED}
)


# StrEnum's functional form: each value is its member's name in lower case (UserRole.VIEWER == "viewer").
UserRole = enum.StrEnum("UserRole", "VIEWER REVIEWER ADMIN")
ReviewDecision = enum.StrEnum("ReviewDecision", "AGREE DISAGREE")
ReaderLabel = enum.StrEnum("ReaderLabel", "PNEUMONIA NORMAL")
OutboxStatus = enum.StrEnum("OutboxStatus", "PENDING SENT FAILED")


class OutboxKind(enum.StrEnum):
    STRUCTURED_REPORT = "sr"
    SECONDARY_CAPTURE = "sc"
    KEY_OBJECT = "ko"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True)}


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default=ImageStatus.QUEUED)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime | None]
    #: Who holds the lease (a Celery task id): a retried or redelivered task may take its own images back.
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    #: When the image was last sent to the broker: only work sent longer ago than a lease is re-sent.
    sent_at: Mapped[datetime | None]
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    source_format: Mapped[str | None] = mapped_column(String(16))
    # DICOM attributes; identifiers are stored for the worklist, never logged.
    study_uid: Mapped[str | None] = mapped_column(String(128))
    series_uid: Mapped[str | None] = mapped_column(String(128))
    sop_uid: Mapped[str | None] = mapped_column(String(128))
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(128))
    patient_name: Mapped[str | None] = mapped_column(String(256))
    patient_age_years: Mapped[float | None] = mapped_column(Float)
    modality: Mapped[str | None] = mapped_column(String(16))
    view_position: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[date | None] = mapped_column(Date)
    out_of_scope: Mapped[bool] = mapped_column(Boolean, default=False)
    scope_note: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    reviewed_at: Mapped[datetime | None]
    reviewed_by: Mapped[str | None] = mapped_column(String(128))
    #: The site the film came from, resolved from its path when it was registered (db/sites.py);
    #: ``default`` for a film from no configured source.
    site: Mapped[str] = mapped_column(String(64), default="default", server_default="default")

    sources: Mapped[list[SourceFile]] = relationship(back_populates="image", order_by="SourceFile.id")
    scores: Mapped[list[Score]] = relationship(back_populates="image", order_by="Score.id")


class SourceFile(Base):
    __tablename__ = "source_files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    image_id: Mapped[int | None] = mapped_column(ForeignKey("images.id", ondelete="SET NULL"), index=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    seen_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image | None] = relationship(back_populates="sources")


class Score(Base):
    __tablename__ = "scores"
    __table_args__ = (UniqueConstraint("image_id", "model_version", name="uq_scores_image_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(128))
    pneumonia_probability: Mapped[float] = mapped_column(Float)
    pneumonia_logit: Mapped[float] = mapped_column(Float)
    viral_probability: Mapped[float | None] = mapped_column(Float)
    screening_threshold: Mapped[float] = mapped_column(Float)
    high_confidence_threshold: Mapped[float] = mapped_column(Float)
    screening_positive: Mapped[bool] = mapped_column(Boolean)
    high_confidence_positive: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="scores")


class Calibration(Base):
    """Operating points for one model version: for one site (``site``) or, where ``site`` is NULL,
    for every site without its own. One row per (model version, site) is active; names are unique
    per model version across sites."""

    __tablename__ = "calibrations"
    __table_args__ = (UniqueConstraint("model_version", "name", name="uq_calibrations_model_name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(128), index=True)
    screening_threshold: Mapped[float] = mapped_column(Float)
    high_confidence_threshold: Mapped[float] = mapped_column(Float)
    temperature: Mapped[float | None] = mapped_column(Float)
    active: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Where the labels came from: ``shipped``, ``labels`` (a local labelled folder/CSV) or ``reviews``.
    source: Mapped[str] = mapped_column(String(16))
    sample_size: Mapped[int] = mapped_column(Integer, default=0)
    positives: Mapped[int] = mapped_column(Integer, default=0)
    target_sensitivity: Mapped[float | None] = mapped_column(Float)
    target_specificity: Mapped[float | None] = mapped_column(Float)
    #: JSON: bootstrap confidence intervals and anything else worth showing.
    details: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The site whose films follow this calibration; NULL: every site without an active one of its own.
    site: Mapped[str | None] = mapped_column(String(64))


class Site(Base):
    """A site of a hospital group: a name with its sources (:class:`SiteSource`)."""

    __tablename__ = "sites"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    sources: Mapped[list[SiteSource]] = relationship(
        back_populates="site_row", order_by="SiteSource.id", cascade="all, delete-orphan"
    )


class SourceKind(enum.StrEnum):
    #: A drop-folder path prefix: every film under it.
    FOLDER = "folder"
    #: A DICOM calling AE title: every film the DICOM listener received from it.
    CALLING_AE = "calling_ae"


class SiteSource(Base):
    """One source of a site; a source belongs to one site."""

    __tablename__ = "site_sources"
    __table_args__ = (UniqueConstraint("kind", "value", name="uq_site_sources_kind_value"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(ForeignKey("sites.name", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    value: Mapped[str] = mapped_column(Text)

    site_row: Mapped[Site] = relationship(back_populates="sources")


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Review(Base):
    """A reader's decision on a film; a disagreement is the reader's label (local ground truth)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    username: Mapped[str] = mapped_column(String(64))
    decision: Mapped[str] = mapped_column(String(16))
    reader_label: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(128))
    score: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Append-only: who viewed which film, who reviewed what, user changes."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    username: Mapped[str | None] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    image_id: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[str | None] = mapped_column(Text)


class OutboxItem(Base):
    """A DICOM object to send to a destination; sent once per (image, model, destination, kind), and
    once per (film's SOP Instance UID, model, destination, kind): one instance received twice, in two
    transfer syntaxes, is one film (``uq_outbox_instance``, migration 0006)."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("image_id", "model_version", "destination", "kind", name="uq_outbox_once"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"))
    model_version: Mapped[str] = mapped_column(String(128))
    destination: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(8))
    status: Mapped[str] = mapped_column(String(16), default=OutboxStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64))
    #: The SOP Instance UID of the film this object is about (None for a film without one).
    source_sop_uid: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]


Index("ix_images_status_lease", Image.status, Image.lease_expires_at)
Index(
    "uq_outbox_instance",
    OutboxItem.source_sop_uid,
    OutboxItem.model_version,
    OutboxItem.destination,
    OutboxItem.kind,
    unique=True,
)


class AppSecret(Base):
    """Keys a service generates once and shares between its processes (the web session key)."""

    __tablename__ = "app_secrets"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorklistOrder(Base):
    """Each film's place in the worklist, kept up to date by triggers (migration 0004); read through
    the ``triage_worklist`` view, never written by the application."""

    __tablename__ = "worklist_order"

    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), primary_key=True)
    score_id: Mapped[int | None] = mapped_column(Integer)
    calibration_id: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    tier: Mapped[str | None] = mapped_column(String(8))
    worklist_rank: Mapped[float] = mapped_column(Float)


# Migration 0004: what the worklist view's order and the web page's filters need.
Index("ix_worklist_order_rank", WorklistOrder.worklist_rank)
Index("ix_worklist_order_tier_rank", WorklistOrder.tier, WorklistOrder.worklist_rank)
Index("ix_worklist_order_status_rank", WorklistOrder.status, WorklistOrder.worklist_rank)
Index("ix_scores_image_id_id", Score.image_id, Score.id)
Index("ix_source_files_image_seen", SourceFile.image_id, SourceFile.seen_at, SourceFile.id)
Index("ix_images_first_seen_at", Image.first_seen_at)
Index("ix_images_reviewed_at", Image.reviewed_at)
Index("ix_images_accession_number", Image.accession_number)
Index("ix_images_patient_id", Image.patient_id)
Index("ix_calibrations_model_active", Calibration.model_version, Calibration.active)
# Migration 0005: the worklist's study-date range filter.
Index("ix_images_study_date", Image.study_date)
# Migration 0006: the site filter of the worklist and the quality report; each site's calibrations.
Index("ix_images_site", Image.site)
Index("ix_calibrations_model_site", Calibration.model_version, Calibration.site)
