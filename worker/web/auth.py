"""Who is asking: session cookies for the pages, HTTP Basic for scripts, roles, CSRF, sign-in limits.

* The session cookie holds only a signed (itsdangerous) user name and CSRF token; the user and the
  role are read from the database on every request, so removing a user takes effect at once.
  The cookie is HttpOnly, SameSite=Strict, and Secure when the request came over https.
* Every form post made with a session cookie needs both a same-origin ``Origin`` (or ``Referer``)
  and the session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``).
  HTTP Basic requests carry no ambient credential, so they need neither.
* Sign-in failures are limited per client address and per user name (:class:`SignInLimiter`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from itsdangerous import BadSignature, URLSafeTimedSerializer

from db.engine import session_scope
from db.schema import UserRole
from db.users import authenticate, can, get_user

COOKIE = "cxr_session"
SESSION_MAX_AGE_S = 12 * 3600
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class NotSignedIn(Exception):
    """No valid session or credentials."""


class Forbidden(Exception):
    """Signed in, but the role does not allow this, or a cross-site / token-less post."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyAttempts(Exception):
    """Too many failed sign-ins from this address or for this name."""


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    csrf_token: str
    via_session: bool

    def can(self, needed: UserRole) -> bool:
        return can(self.role, needed)


class SignInLimiter:
    """At most ``max_failures`` failed sign-ins per ``window_s`` for one address or one user name."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures[key]
        while times and now - times[0] > self.window_s:
            times.popleft()
        return times

    def check(self, address: str, username: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"a:{address}", f"u:{username.lower()}"):
                if len(self._recent(key, now)) >= self.max_failures:
                    raise TooManyAttempts()

    def failed(self, address: str, username: str) -> None:
        now = time.monotonic()
        with self._lock:
            for key in (f"a:{address}", f"u:{username.lower()}"):
                self._recent(key, now).append(now)

    def succeeded(self, username: str) -> None:
        with self._lock:
            self._failures.pop(f"u:{username.lower()}", None)


class Sessions:
    """Signing and reading the session cookie."""

    def __init__(self, key: str) -> None:
        self._serializer = URLSafeTimedSerializer(key, salt="cxr-triage-session")

    def issue(self, username: str) -> tuple[str, str]:
        csrf = secrets.token_urlsafe(24)
        return self._serializer.dumps({"u": username, "c": csrf}), csrf

    def read(self, cookie: str) -> tuple[str, str] | None:
        try:
            data = self._serializer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except BadSignature:
            return None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("u"), str)
            or not isinstance(data.get("c"), str)
        ):
            return None
        return data["u"], data["c"]


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _basic_credentials(request: Request) -> tuple[str, str] | None:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


def principal(request: Request) -> Principal:
    """The signed-in user of this request, or :class:`NotSignedIn`."""
    state = request.app.state.web
    basic = _basic_credentials(request)
    if basic is not None:
        address = client_address(request)
        state.limiter.check(address, basic[0])
        with session_scope(state.database_url) as session:
            user = authenticate(session, *basic)
            if user is None:
                state.limiter.failed(address, basic[0])
                raise NotSignedIn()
            return Principal(user.username, user.role, "", via_session=False)
    cookie = request.cookies.get(COOKIE)
    read = state.sessions.read(cookie) if cookie else None
    if read is None:
        raise NotSignedIn()
    username, csrf = read
    with session_scope(state.database_url) as session:
        user = get_user(session, username)
        if user is None:
            raise NotSignedIn()
        return Principal(user.username, user.role, csrf, via_session=True)


def same_origin(request: Request) -> bool:
    """True when the request's Origin (or, failing that, Referer) is this server."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return False
    parts = urlsplit(source)
    host = request.headers.get("host", "")
    return parts.scheme in ("http", "https") and parts.netloc == host and parts.scheme == request.url.scheme


async def check_csrf(request: Request, who: Principal) -> None:
    """Refuse a cookie-authenticated state change from another site or without the session's token."""
    if request.method not in UNSAFE_METHODS or not who.via_session:
        return
    if not same_origin(request):
        raise Forbidden("cross-site request refused")
    token = request.headers.get("x-csrf-token")
    if token is None and request.headers.get("content-type", "").startswith(
        ("application/x-www-form-urlencoded", "multipart/form-data")
    ):
        token = (await request.form()).get("csrf_token")
    if not isinstance(token, str) or not hmac.compare_digest(token, who.csrf_token):
        raise Forbidden("missing or wrong CSRF token: reload the page")


def require(needed: UserRole):
    """A FastAPI dependency: the principal, who must hold ``needed`` (and pass the CSRF check)."""

    async def dependency(request: Request) -> Principal:
        who = principal(request)
        await check_csrf(request, who)
        if not who.can(needed):
            raise Forbidden(f"your role ({who.role}) cannot do this")
        return who

    return dependency


def cookie_secure(request: Request) -> bool:
    return request.url.scheme == "https"
