"""The audit log: who viewed which film, who reviewed what and when, user changes, sign-ins.

Append-only: migration 0004 puts triggers on ``audit_log`` that refuse UPDATE and DELETE.
The ``detail`` text never holds patient data; films are named by their image id.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.schema import AuditEvent, Image, utcnow


class AuditAction(enum.StrEnum):
    VIEW = "view"
    REVIEW = "review"
    SIGN_IN = "sign_in"
    SIGN_IN_FAILED = "sign_in_failed"
    SIGN_OUT = "sign_out"
    EXPORT = "export"
    #: Rows read through the JSON API (a script's bulk read of patient data).
    LIST = "list"
    USER_ADD = "user_add"
    USER_REMOVE = "user_remove"
    PASSWORD_CHANGE = "password_change"


def record(
    session: Session,
    action: AuditAction,
    username: str | None,
    image_id: int | None = None,
    detail: str | None = None,
) -> None:
    session.add(
        AuditEvent(at=utcnow(), username=username, action=action.value, image_id=image_id, detail=detail)
    )


def events(session: Session, since: datetime | None = None, limit: int | None = None) -> list[dict]:
    """Audit events, oldest first, with the film's SHA-256 where there is one."""
    query = (
        select(AuditEvent, Image.sha256)
        .outerjoin(Image, Image.id == AuditEvent.image_id)
        .order_by(AuditEvent.at, AuditEvent.id)
    )
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    if limit is not None:
        query = query.limit(limit)
    return [
        {
            "at": event.at.isoformat(),
            "username": event.username,
            "action": event.action,
            "sha256": sha256,
            "detail": event.detail,
        }
        for event, sha256 in session.execute(query)
    ]
