"""Readers' decisions on films: Agree / Disagree with the model's call, stored as a label.

The model's call is the film's screening tier under the calibration in force (the worklist view):
screening-positive means "pneumonia". An Agree keeps that call as the reader's label, a Disagree
flips it; the labels are the local ground truth that ``model calibrate --from-reviews`` learns from.
"""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.schema import Image, ImageStatus, ReaderLabel, Review, ReviewDecision, utcnow
from db.worklist import film


class ReviewError(ValueError):
    """A review that cannot be recorded (unknown film, nothing scored to agree with)."""


def reader_label(model_says_pneumonia: bool, decision: ReviewDecision) -> ReaderLabel:
    agrees = decision is ReviewDecision.AGREE
    return ReaderLabel.PNEUMONIA if model_says_pneumonia == agrees else ReaderLabel.NORMAL


def record_review(
    session: Session, sha256: str, username: str, decision: ReviewDecision, note: str | None = None
) -> Review:
    """Store the decision and mark the film reviewed (it leaves the top of the worklist)."""
    row = film(session, sha256)
    if row is None:
        raise ReviewError("no such film")
    if row["status"] != ImageStatus.SCORED or row["score"] is None:
        raise ReviewError("this film has no score to agree or disagree with")
    image_id = session.scalar(select(Image.id).where(Image.sha256 == sha256))
    review = Review(
        image_id=image_id,
        username=username,
        decision=decision.value,
        reader_label=reader_label(bool(row["screening_positive"]), decision).value,
        note=(note or "").strip()[:2000] or None,
        model_version=row["model_version"],
        score=row["score"],
        created_at=utcnow(),
    )
    session.add(review)
    session.execute(
        update(Image).where(Image.id == image_id).values(reviewed_at=utcnow(), reviewed_by=username)
    )
    session.flush()
    return review


def reviews_of(session: Session, sha256: str) -> list[Review]:
    return list(
        session.scalars(
            select(Review)
            .join(Image, Image.id == Review.image_id)
            .where(Image.sha256 == sha256)
            .order_by(Review.id)
        )
    )


def dismiss(session: Session, sha256: str, username: str) -> int:
    """Mark a film with no score (rejected or failed) as dealt with by ``username``: it leaves the top
    of the worklist like a reviewed film. Returns the image's id."""
    row = film(session, sha256)
    if row is None:
        raise ReviewError("no such film")
    if row["status"] not in (ImageStatus.REJECTED, ImageStatus.FAILED):
        raise ReviewError("only rejected or failed films can be dismissed")
    image_id = session.scalar(select(Image.id).where(Image.sha256 == sha256))
    session.execute(
        update(Image).where(Image.id == image_id).values(reviewed_at=utcnow(), reviewed_by=username)
    )
    session.flush()
    return image_id
