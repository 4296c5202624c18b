"""Alembic environment: runs against the URL passed by :func:`db.migrate.upgrade`."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from db.engine import get_engine
from db.schema import Base

config = context.config
url = config.attributes.get("database_url") or config.get_main_option("sqlalchemy.url")

#: Serialises concurrent upgrades from several workers starting at once (PostgreSQL only).
ADVISORY_LOCK_KEY = 7_226_143


def run_migrations_online() -> None:
    engine = get_engine(url)
    with engine.connect() as connection:
        is_postgres = connection.dialect.name == "postgresql"
        is_sqlite = connection.dialect.name == "sqlite"
        if is_postgres:
            connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": ADVISORY_LOCK_KEY})
            connection.commit()
        if is_sqlite:
            # SQLite rebuilds a table (batch mode) by dropping the old one: with foreign keys on, that
            # deletes every dependent row (ON DELETE CASCADE from images: scores, reviews, outbox). Alembic's
            # advice: off for the migrations (a no-op inside a transaction, so before it), on again after.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            context.configure(
                connection=connection,
                target_metadata=Base.metadata,
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
        finally:
            if is_sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
            if is_postgres:
                connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_LOCK_KEY})
                connection.commit()


run_migrations_online()
