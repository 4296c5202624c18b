"""Stored calibrations: a site's operating thresholds per model version, one of them active.

Every reader of thresholds (the worklist view, the commands, the workers) asks
:func:`active_calibration` at the time it needs them, so activating another calibration takes
effect without a restart. The thresholds that ship with the model are kept as a calibration
named :data:`SHIPPED` (``source='shipped'``), created on demand, so a site can always go back.
Only the ``db`` layer is imported here: callers pass the shipped thresholds in.

Sites (db/sites.py): a calibration with a ``site`` applies to that site's films only; one with
none (``site IS NULL``: the shipped one and every calibration stored without ``--site``) applies to
every site that has no active calibration of its own. One calibration is active per (model
version, site); calibration names stay unique per model version. The worklist view makes the same
choice in SQL (``db.worklist_sql.CALIBRATION_JOIN_SITES``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from db.schema import Calibration, Image, Review, Score

SHIPPED = "shipped"
SOURCES = ("shipped", "labels", "reviews")


class CalibrationError(ValueError):
    """A calibration cannot be stored or activated (clear message for the user)."""


@dataclass(frozen=True)
class ShippedThresholds:
    """The operating points that ship in the model's metadata (``metadata.json``: ``version``,
    ``screening_threshold``, ``high_confidence_threshold``, ``temperature``).

    ``temperature`` is stored with the shipped calibration row (:func:`ensure_shipped`); None where
    only the thresholds are asked for (:func:`thresholds_in_force`).
    """

    model_version: str
    screening_threshold: float
    high_confidence_threshold: float
    temperature: float | None = None

    @classmethod
    def from_metadata(cls, meta: Mapping) -> ShippedThresholds:
        """Read from a model's ``metadata.json`` (a missing temperature is 1.0: none applied)."""
        return cls(
            str(meta["version"]),
            float(meta["screening_threshold"]),
            float(meta["high_confidence_threshold"]),
            float(meta.get("temperature", 1.0)),
        )


def details_of(row: Calibration) -> dict:
    """The row's JSON details (CIs, warnings), or an empty dict."""
    return json.loads(row.details) if row.details else {}


def ensure_shipped(session: Session, shipped: ShippedThresholds) -> Calibration:
    """The shipped calibration row of ``shipped.model_version``; created (active if no calibration
    for every site is) when missing."""
    row = _named(session, shipped.model_version, SHIPPED)
    if row is not None:
        return row
    has_active = session.scalar(
        select(func.count())
        .select_from(Calibration)
        .where(
            Calibration.model_version == shipped.model_version,
            Calibration.active.is_(True),
            Calibration.site.is_(None),
        )
    )
    row = Calibration(
        name=SHIPPED,
        model_version=shipped.model_version,
        screening_threshold=shipped.screening_threshold,
        high_confidence_threshold=shipped.high_confidence_threshold,
        temperature=shipped.temperature,
        active=not has_active,
        source="shipped",
        details=json.dumps({"note": "thresholds fitted on the model's validation split (see MODEL_CARD.md)"}),
    )
    session.add(row)
    session.flush()
    return row


def store(
    session: Session,
    *,
    name: str,
    model_version: str,
    screening_threshold: float,
    high_confidence_threshold: float,
    source: str,
    sample_size: int,
    positives: int,
    target_sensitivity: float | None,
    target_specificity: float | None,
    temperature: float | None = None,
    details: dict | None = None,
    activate: bool = True,
    replace: bool = False,
    site: str | None = None,
) -> Calibration:
    """Store a calibration (and make it the active one unless ``activate`` is false): for ``site``'s
    films, or for every site without its own where ``site`` is None."""
    if source not in SOURCES:
        raise CalibrationError(f"source must be one of {', '.join(SOURCES)}")
    if name == SHIPPED:
        raise CalibrationError(f"the name {SHIPPED!r} is reserved for the model's own thresholds")
    if not 0.0 <= screening_threshold <= high_confidence_threshold <= 1.0:
        raise CalibrationError("thresholds must satisfy 0 <= screening <= high confidence <= 1")
    existing = _named(session, model_version, name)
    if existing is not None:
        if not replace:
            raise CalibrationError(f"a calibration named {name!r} exists for this model; choose another name")
        session.delete(existing)
        session.flush()
    row = Calibration(
        name=name,
        model_version=model_version,
        screening_threshold=float(screening_threshold),
        high_confidence_threshold=float(high_confidence_threshold),
        temperature=temperature,
        active=False,
        source=source,
        sample_size=int(sample_size),
        positives=int(positives),
        target_sensitivity=target_sensitivity,
        target_specificity=target_specificity,
        details=json.dumps(details or {}),
        site=site,
    )
    session.add(row)
    session.flush()
    if activate:
        activate_calibration(session, model_version, name)
    return row


def activate_calibration(
    session: Session, model_version: str, name: str, site: str | None = None
) -> Calibration | None:
    """Make ``name`` the one active calibration of ``model_version`` for the sites it applies to.

    With ``site``: ``name`` must be that site's (or ``shipped``: the site then has no active
    calibration of its own and follows the one for every site; None is returned).
    """
    if site is not None and name == SHIPPED:
        _deactivate(session, model_version, site)
        session.flush()
        return None
    row = _named(session, model_version, name)
    if row is None:
        known = ", ".join(r.name for r in list_calibrations(session, model_version, site=site)) or "none"
        raise CalibrationError(f"no calibration named {name!r} for this model (known: {known})")
    if site is not None and row.site != site:
        raise CalibrationError(f"calibration {name!r} is not one of site {site!r}")
    _deactivate(session, model_version, row.site, but=row.id)
    row.active = True
    session.flush()
    return row


def _deactivate(session: Session, model_version: str, site: str | None, but: int | None = None) -> None:
    same_site = Calibration.site.is_(None) if site is None else Calibration.site == site
    query = update(Calibration).where(Calibration.model_version == model_version, same_site)
    if but is not None:
        query = query.where(Calibration.id != but)
    session.execute(query.values(active=False))


def active_calibration(session: Session, model_version: str, site: str | None = None) -> Calibration | None:
    """The calibration in force for ``site``'s films (its own active one, else the active one for
    every site), or for every site where ``site`` is None; None: the shipped thresholds apply."""
    query = select(Calibration).where(
        Calibration.model_version == model_version, Calibration.active.is_(True)
    )
    if site is None:
        query = query.where(Calibration.site.is_(None))
    else:
        query = query.where((Calibration.site == site) | Calibration.site.is_(None))
    # the site's own first (NULLs sort last in both dialects with this CASE), newest first
    own_first = case((Calibration.site.is_(None), 1), else_=0)
    return session.scalars(query.order_by(own_first, Calibration.id.desc()).limit(1)).first()


def thresholds_in_force(
    session: Session, shipped: ShippedThresholds, site: str | None = None
) -> tuple[str, float, float]:
    """(name, screening, high-confidence) in force for the shipped model's version (at ``site``)."""
    row = active_calibration(session, shipped.model_version, site)
    if row is None:
        return SHIPPED, shipped.screening_threshold, shipped.high_confidence_threshold
    return row.name, row.screening_threshold, row.high_confidence_threshold


def thresholds_by_site(
    session: Session, shipped: ShippedThresholds, sites: set[str]
) -> dict[str, tuple[float, float]]:
    """{site: (screening, high-confidence)} in force for each of ``sites`` (a worker's batch)."""
    return {site: thresholds_in_force(session, shipped, site)[1:] for site in sites}


def list_calibrations(
    session: Session, model_version: str | None = None, site: str | None = None
) -> list[Calibration]:
    """Calibrations, oldest first (of one model version when given; with ``site``: those in force
    there, its own and those for every site)."""
    query = select(Calibration).order_by(Calibration.model_version, Calibration.created_at, Calibration.id)
    if model_version is not None:
        query = query.where(Calibration.model_version == model_version)
    if site is not None:
        query = query.where((Calibration.site == site) | Calibration.site.is_(None))
    return list(session.scalars(query))


def tier(probability: float, screening_threshold: float, high_confidence_threshold: float) -> str:
    """``high_confidence``, ``screen_positive`` or ``negative`` at the given thresholds."""
    if probability >= high_confidence_threshold:
        return "high_confidence"
    if probability >= screening_threshold:
        return "screen_positive"
    return "negative"


@dataclass(frozen=True)
class ReviewLabel:
    """One reviewed film turned into a label for calibration."""

    image_id: int
    label: int  # 1 pneumonia, 0 normal
    probability: float
    logit: float


def review_labels(session: Session, model_version: str, site: str | None = None) -> list[ReviewLabel]:
    """One label per reviewed film scored by ``model_version`` (the latest review of each film wins;
    with ``site``: films of that site only).

    The label is the reader's: ``reader_label`` as recorded by the web worklist, where an Agree
    keeps the model's call and a Disagree flips it. The film's stored score under this model
    version is used (not the score copied into the review), so it matches what scan stored.
    """
    latest: dict[int, Review] = {}
    for review in session.scalars(select(Review).order_by(Review.created_at, Review.id)):
        latest[review.image_id] = review
    if not latest:
        return []
    query = select(Score).where(Score.model_version == model_version, Score.image_id.in_(list(latest)))
    if site is not None:
        query = query.join(Image, Image.id == Score.image_id).where(Image.site == site)
    scores = {s.image_id: s for s in session.scalars(query)}
    out = []
    for image_id, review in sorted(latest.items()):
        score = scores.get(image_id)
        if score is None or review.reader_label not in ("pneumonia", "normal"):
            continue
        out.append(
            ReviewLabel(
                image_id,
                int(review.reader_label == "pneumonia"),
                score.pneumonia_probability,
                score.pneumonia_logit,
            )
        )
    return out


def _named(session: Session, model_version: str, name: str) -> Calibration | None:
    return session.scalars(
        select(Calibration).where(Calibration.model_version == model_version, Calibration.name == name)
    ).first()
