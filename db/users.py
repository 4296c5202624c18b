"""People who sign in to the web worklist: names, roles, argon2 password hashes.

Roles are cumulative: a ``viewer`` sees the worklist and the films, a ``reviewer`` also records
reviews, an ``admin`` also manages users (:func:`can`).
"""

from __future__ import annotations

import re
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.engine import dialect_insert
from db.schema import AppSecret, User, UserRole, utcnow

USERNAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD_LENGTH = 8
_RANK = {UserRole.VIEWER: 0, UserRole.REVIEWER: 1, UserRole.ADMIN: 2}
_hasher = PasswordHasher()
#: Verified against when the user does not exist, so that a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a real password")
SESSION_KEY_NAME = "web_session_key"


class UserError(ValueError):
    """A user change that cannot be made (bad name, short password, unknown or existing user)."""


def can(role: str, needed: UserRole) -> bool:
    """True when ``role`` includes the rights of ``needed``."""
    return role in _RANK and _RANK[UserRole(role)] >= _RANK[needed]


def check_username(username: str) -> str:
    if not USERNAME_PATTERN.match(username):
        raise UserError("a user name is 1-64 letters, digits or . _ @ - (starting with a letter or digit)")
    return username


def add_user(session: Session, username: str, password: str, role: UserRole) -> User:
    check_username(username)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"the password must have at least {MIN_PASSWORD_LENGTH} characters")
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
    if session.execute(delete(User).where(User.username == username)).rowcount != 1:
        raise UserError(f"no user {username!r}")


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The user when the password matches, else None (same work whether or not the name exists)."""
    user = get_user(session, username) if USERNAME_PATTERN.match(username or "") else None
    try:
        _hasher.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
    return user


def session_key(session: Session) -> str:
    """The web session signing key: made once, kept in the database so every web process shares it."""
    key = session.scalar(select(AppSecret.value).where(AppSecret.name == SESSION_KEY_NAME))
    if key is None:
        session.execute(
            dialect_insert(session)(AppSecret)
            .values(name=SESSION_KEY_NAME, value=secrets.token_urlsafe(48), created_at=utcnow())
            .on_conflict_do_nothing(index_elements=["name"])
        )
        key = session.scalar(select(AppSecret.value).where(AppSecret.name == SESSION_KEY_NAME))
    return key
