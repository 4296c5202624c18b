"""Engines and sessions. One engine per process and URL, created lazily after fork.

Every engine hides bound parameters in its error messages (``hide_parameters``):
a failed INSERT would otherwise print patient names, ids and UIDs in a traceback.
A SQLite database holds patient data, so a folder this module creates is 0700 and a
database file it creates is 0600.
"""

from __future__ import annotations

import logging
import math
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

#: Seconds a SQLite writer waits for the lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 60

#: Query-string parameters whose values are secrets (``?password=...``).
SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token", "sslpassword"})

_engines: dict[tuple[int, str], Engine] = {}
log = logging.getLogger(__name__)


def default_database_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "cxr-triage" / "worklist.sqlite3"


def default_database_url() -> str:
    return f"sqlite:///{default_database_path()}"


def masked(url: str | None) -> str:
    """The URL with every password hidden (user info and ``?password=``), for logs and messages.

    Parsed by hand rather than by SQLAlchemy: an unescaped ``@`` in a password
    (``redis://:p@ss@host/0``) must not leave part of it in view, and a broker URL is not a
    SQLAlchemy URL. The user-info part ends at the *last* ``@`` of the authority.
    """
    if not url:
        return str(url)
    try:
        parts = urlsplit(url)
        shown = url
        if "@" in parts.netloc:
            userinfo, _, hostport = parts.netloc.rpartition("@")
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:***@{hostport}" if has_password else f"{user}@{hostport}"
            shown = shown.replace("//" + parts.netloc, "//" + netloc, 1)
        if parts.query:
            pairs = parse_qsl(parts.query, keep_blank_values=True)
            if any(key.lower() in SECRET_QUERY_KEYS for key, _ in pairs):
                query = urlencode(
                    [(k, "***" if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*"
                )
                shown = shown.replace("?" + parts.query, "?" + query, 1)
        return shown
    except Exception:  # noqa: BLE001 - an unparsable URL must still be printable safely
        return "<unparsable URL>"


def _tune_sqlite(dbapi_connection, _record) -> None:
    # The worklist view needs exp(). SQLite's math functions are a compile-time option, and the
    # library a process ends up with depends on what was loaded first: TensorFlow bundles a SQLite
    # without them, so a worker that loads its model before opening the database would lose exp().
    # Registering it on every connection makes the view independent of that accident.
    dbapi_connection.create_function("exp", 1, math.exp, deterministic=True)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_S * 1000}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def create_private_folder(folder: Path) -> None:
    """Create ``folder`` and any missing parents 0700 (owner only); existing folders are left alone."""
    missing = []
    current = folder
    while not current.exists():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for path in reversed(missing):
        with suppress(FileExistsError):
            path.mkdir(mode=0o700)


def create_private_file(path: Path) -> None:
    """Create ``path`` (and its folder) readable by the owner only, before anything writes to it.

    SQLite creates its ``-wal`` and ``-shm`` files with the database file's mode, so a
    0600 database keeps them 0600 too. An existing file keeps its mode; a warning says
    when that mode lets others read patient data.
    """
    create_private_folder(path.parent)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            log.warning("the database file can be read by other users (mode %o); chmod 600 it", mode & 0o777)


def get_engine(url: str) -> Engine:
    """The engine for ``url`` in this process (a forked child gets its own)."""
    key = (os.getpid(), url)
    engine = _engines.get(key)
    if engine is None:
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                create_private_file(Path(parsed.database))
            engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S}, hide_parameters=True)
            event.listen(engine, "connect", _tune_sqlite)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5, hide_parameters=True)
        _engines[key] = engine
    return engine


def session_factory(url: str) -> sessionmaker[Session]:
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str) -> Iterator[Session]:
    """A transaction: committed on success, rolled back on any exception."""
    session = session_factory(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dialect_insert(session: Session):
    """The dialect's own ``insert`` (PostgreSQL's or SQLite's), for ``ON CONFLICT`` clauses."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
