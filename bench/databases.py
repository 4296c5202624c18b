"""Throw-away databases for tests and benchmarks: the one PostgreSQL create/drop helper, SQLite, Redis.

Used by ``tests/conftest.py`` (a fresh PostgreSQL database per test), the benchmarks and the chaos
scenarios, so that all of them create and drop databases the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url

#: Admin connection of the local PostgreSQL server (trust authentication).
PG_ADMIN_URL = os.environ.get("CXR_BENCH_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test").replace(
    "postgresql://", "postgresql+psycopg://", 1
)
REDIS_URL = os.environ.get("CXR_BENCH_REDIS", "redis://127.0.0.1:6379/13")


def _admin(admin_url: str, *statements: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            for statement in statements:
                connection.execute(text(statement))
    finally:
        engine.dispose()


def database_url(name: str, admin_url: str = PG_ADMIN_URL, port: int | None = None) -> str:
    """SQLAlchemy URL of database ``name`` on the admin URL's server (optionally another port)."""
    url = make_url(admin_url).set(database=name)
    if port is not None:
        url = url.set(port=port)
    return url.render_as_string(hide_password=False)


def create_postgres(name: str, admin_url: str = PG_ADMIN_URL) -> str:
    """Drop (if there) and create database ``name``; return its URL. Raises when the server is down."""
    _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
    return database_url(name, admin_url)


def drop_postgres(name: str, admin_url: str = PG_ADMIN_URL) -> None:
    """Drop database ``name``, closing the connections still open to it."""
    _admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_sqlite(path: Path) -> str:
    """URL of an empty SQLite file at ``path`` (old file and journals removed)."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def flush_redis(url: str = REDIS_URL) -> None:
    """Empty one Redis database (never FLUSHALL on a shared server)."""
    import redis

    redis.Redis.from_url(url).flushdb()
