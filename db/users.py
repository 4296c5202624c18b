"""People who sign in to the web worklist: names, roles, argon2 password hashes.

Roles are cumulative: a ``viewer`` sees the worklist and the films, a ``reviewer`` also records
reviews, an ``admin`` also manages users (:func:`can`).
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from db.engine import session_scope
from db.schema import User, UserRole, WebSession

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
_RANK = {UserRole.VIEWER: 0, UserRole.REVIEWER: 1, UserRole.ADMIN: 2}
_hasher = PasswordHasher()
#: Password checks running at once in this process: each takes 64 MiB and a core for ~0.1 s, so a burst
#: of sign-ins queues here instead of starving every other request of memory and CPU.
_checks = threading.BoundedSemaphore(max(2, (os.cpu_count() or 2) // 2))
#: Verified against when the user does not exist, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a real password")


class UserError(ValueError):
    """A user change that cannot be made (bad name, short password, unknown or existing user)."""


def can(role: str, needed: UserRole) -> bool:
    """True when ``role`` includes the rights of ``needed``."""
    return role in _RANK and _RANK[UserRole(role)] >= _RANK[needed]


def check_username(username: str) -> str:
    if not USERNAME_PATTERN.match(username):
        raise UserError("a user name is 1-64 letters, digits or . _ @ - (starting with a letter or digit)")
    return username


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")


def add_user(session: Session, username: str, password: str, role: UserRole) -> User:
    check_username(username)
    _check_password(password)
    if get_user(session, username) is not None:
        raise UserError(f"user {username!r} exists already")
    user = User(username=username, password_hash=_hasher.hash(password), role=UserRole(role).value)
    session.add(user)
    session.flush()
    return user


def get_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))


def list_users(session: Session) -> list[User]:
    return list(session.scalars(select(User).order_by(User.username)))


def remove_user(session: Session, username: str) -> None:
    """Remove the user and end every web session of theirs (SQLite does not enforce the cascade)."""
    user = get_user(session, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))
    session.execute(delete(User).where(User.id == user.id))


def set_password(session: Session, username: str, password: str) -> None:
    """A new password; every web session of the user ends (whoever knew the old one is signed out)."""
    _check_password(password)
    user = get_user(session, username)
    if user is None:
        raise UserError(f"no user {username!r}")
    user.password_hash = _hasher.hash(password)
    session.execute(delete(WebSession).where(WebSession.user_id == user.id))


@dataclass(frozen=True)
class Verified:
    """Who signed in: the user's id, name and role when the password was checked."""

    id: int
    username: str
    role: str


def authenticate(database_url: str, username: str, password: str) -> Verified | None:
    """The user when the password matches, else None (same work whether or not the name exists).

    The password hash is read in one short transaction and checked (argon2: ~0.1 s of CPU and
    64 MiB) with no database connection held, so that a burst of sign-ins cannot take every pooled
    connection; a hash made with older parameters is replaced in a second short transaction.
    """
    stored = None
    if USERNAME_PATTERN.match(username or ""):
        with session_scope(database_url) as session:
            user = get_user(session, username)
            if user is not None:
                stored = (Verified(user.id, user.username, user.role), user.password_hash)
    try:
        with _checks:
            _hasher.verify(stored[1] if stored else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if stored is None:
        return None
    who, password_hash = stored
    if _hasher.check_needs_rehash(password_hash):
        with session_scope(database_url) as session:
            session.execute(
                update(User).where(User.id == who.id).values(password_hash=_hasher.hash(password))
            )
    return who
