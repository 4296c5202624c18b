"""Server-side sessions of the web worklist (table ``web_sessions``).

The browser holds a random 256-bit token; the database holds only its SHA-256, so a database
reader (a BI tool, a backup) learns no usable session, and there is no signing key to steal.
A session ends when it expires, when its user signs out, is removed or gets a new password.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.schema import User, WebSession, utcnow

#: A session lasts at most this long after sign-in (a reading-room shift).
SESSION_MAX_AGE_S = 12 * 3600


@dataclass(frozen=True)
class SessionUser:
    username: str
    role: str
    csrf_token: str


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def open_session(session: Session, user_id: int, max_age_s: float = SESSION_MAX_AGE_S) -> tuple[str, str]:
    """A new session for the user ``user_id``: (the cookie's token, the session's CSRF token)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    now = utcnow()
    session.add(
        WebSession(
            token_sha256=_digest(token),
            user_id=user_id,
            csrf_token=csrf,
            created_at=now,
            expires_at=now + timedelta(seconds=max_age_s),
        )
    )
    return token, csrf


def read_session(session: Session, token: str) -> SessionUser | None:
    """The user of a live session, or None (unknown, expired, or the user is gone)."""
    if not token or len(token) > 256:
        return None
    row = session.execute(
        select(User.username, User.role, WebSession.csrf_token)
        .join(User, User.id == WebSession.user_id)
        .where(WebSession.token_sha256 == _digest(token), WebSession.expires_at > utcnow())
    ).first()
    return SessionUser(*row) if row else None


def end_session(session: Session, token: str) -> None:
    session.execute(delete(WebSession).where(WebSession.token_sha256 == _digest(token)))


def prune_expired(session: Session) -> int:
    """Delete expired sessions; returns how many."""
    return session.execute(delete(WebSession).where(WebSession.expires_at <= utcnow())).rowcount or 0
