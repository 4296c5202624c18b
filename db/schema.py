"""Database schema (SQLAlchemy 2.0 typed ORM). Changes go through Alembic migrations.

* ``images``: one row per distinct file content (SHA-256). Its ``status`` walks
  ``queued -> processing -> scored | rejected | failed``; ``attempts`` counts claims
  so that a file that keeps killing its worker is failed, not retried forever.
* ``source_files``: every path a content was seen under, with size and mtime so a
  backlog rescan can skip known files without hashing them.
* ``scores``: one row per (image, model version): the unique key makes result
  writes idempotent when a task is delivered twice.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
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


FINAL_STATUSES = frozenset({ImageStatus.SCORED, ImageStatus.REJECTED, ImageStatus.FAILED})


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
    lease_owner: Mapped[str | None] = mapped_column(String(64))
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
    out_of_scope: Mapped[bool] = mapped_column(Boolean, default=False)
    scope_note: Mapped[str | None] = mapped_column(Text)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    reviewed_at: Mapped[datetime | None]
    reviewed_by: Mapped[str | None] = mapped_column(String(128))

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


Index("ix_images_status_lease", Image.status, Image.lease_expires_at)
