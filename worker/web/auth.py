"""Who is asking: session cookies for the pages, HTTP Basic for scripts, roles, CSRF, sign-in limits.

* The session cookie holds only a random token; the session is a row of ``web_sessions``
  (:mod:`db.web_sessions`, keyed by the token's SHA-256), read with its user and role on every
  request, so signing out, removing a user or changing a password takes effect at once. There is
  no signing key. The cookie is HttpOnly, SameSite=Strict, and Secure when the request came over https.
* Every form post made with a session cookie needs both a same-origin ``Origin`` (or ``Referer``)
  and the session's CSRF token (form field ``csrf_token`` or header ``X-CSRF-Token``).
  HTTP Basic (for scripts, on ``/api/`` only) carries no ambient credential, so it needs neither.
* Failed sign-ins slow down the next attempts on that name from that address (:class:`SignInLimiter`).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from db.engine import session_scope
from db.schema import UserRole
from db.users import authenticate, can
from db.web_sessions import read_session

COOKIE = "cxr_session"
UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class NotSignedIn(Exception):
    """No valid session or credentials."""


class Forbidden(Exception):
    """Signed in, but the role does not allow this, or a cross-site / token-less post."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyAttempts(Exception):
    """Too many failed sign-ins for this name from this address (or from this address)."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(retry_after_s)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class Principal:
    username: str
    role: str
    csrf_token: str
    via_session: bool

    def can(self, needed: UserRole) -> bool:
        return can(self.role, needed)


@dataclass
class _Failures:
    count: int = 0
    last_at: float = 0.0
    blocked_until: float = 0.0


class SignInLimiter:
    """A progressive delay after failed sign-ins, counted per (user name, client address).

    A wrong password from one address slows only that address's attempts on that name, so nobody
    can lock a colleague out from elsewhere; one address guessing many names is slowed too (a
    larger allowance, counted per address). After ``free_failures`` failures each further one
    doubles the wait, from ``first_delay_s`` up to ``max_delay_s``. A record is forgotten
    ``forget_after_s`` after its last failure, and at most ``max_entries`` are kept (least recently
    failed first out), so the limiter's memory is bounded whatever names are tried.
    """

    def __init__(
        self,
        *,
        free_failures: int = 3,
        free_failures_per_address: int = 30,
        first_delay_s: float = 1.0,
        max_delay_s: float = 300.0,
        forget_after_s: float = 900.0,
        max_entries: int = 10_000,
        clock=time.monotonic,
    ) -> None:
        self.free_failures = free_failures
        self.free_failures_per_address = free_failures_per_address
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.forget_after_s = forget_after_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, ...], _Failures] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    @staticmethod
    def _keys(address: str, username: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return ("pair", username.lower()[:64], address), ("address", address)

    def _prune(self, now: float) -> None:
        while self._entries:
            key, oldest = next(iter(self._entries.items()))
            if len(self._entries) <= self.max_entries and now - oldest.last_at <= self.forget_after_s:
                break
            del self._entries[key]

    def check(self, address: str, username: str) -> None:
        """Raise :class:`TooManyAttempts` while this name from this address must wait."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            entries = [self._entries.get(key) for key in self._keys(address, username)]
        wait = max((e.blocked_until - now for e in entries if e is not None), default=0.0)
        if wait > 0:
            raise TooManyAttempts(wait)

    def failed(self, address: str, username: str) -> None:
        now = self._clock()
        pair, per_address = self._keys(address, username)
        with self._lock:
            for key, free in ((pair, self.free_failures), (per_address, self.free_failures_per_address)):
                entry = self._entries.pop(key, None) or _Failures()
                entry.count += 1
                entry.last_at = now
                if entry.count > free:
                    delay = self.first_delay_s * 2 ** min(entry.count - free - 1, 30)
                    entry.blocked_until = now + min(delay, self.max_delay_s)
                self._entries[key] = entry  # most recently failed at the end
            self._prune(now)

    def succeeded(self, address: str, username: str) -> None:
        with self._lock:
            self._entries.pop(self._keys(address, username)[0], None)


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
    """The signed-in user of this request, or :class:`NotSignedIn`.

    Blocking (argon2, the database): called in the thread pool, never on the event loop.
    HTTP Basic counts only on ``/api/`` routes; the pages and their forms need the session cookie
    (and so the Origin and CSRF checks).
    """
    state = request.app.state.web
    basic = _basic_credentials(request) if request.url.path.startswith("/api/") else None
    if basic is not None:
        address = client_address(request)
        state.limiter.check(address, basic[0])
        user = authenticate(state.database_url, *basic)
        if user is None:
            state.limiter.failed(address, basic[0])
            raise NotSignedIn()
        return Principal(user.username, user.role, "", via_session=False)
    token = request.cookies.get(COOKIE)
    if not token:
        raise NotSignedIn()
    with session_scope(state.database_url) as session:
        found = read_session(session, token)
    if found is None:
        raise NotSignedIn()
    return Principal(found.username, found.role, found.csrf_token, via_session=True)


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
        who = await run_in_threadpool(principal, request)
        await check_csrf(request, who)
        if not who.can(needed):
            raise Forbidden(f"your role ({who.role}) cannot do this")
        return who

    return dependency


def cookie_secure(request: Request) -> bool:
    return request.url.scheme == "https"
