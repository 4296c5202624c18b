"""Run Alembic migrations programmatically (``cxr-triage db upgrade``).

Every command that uses the database brings the schema up to date at start. When it already is,
that is one query, :func:`schema_is_current`, without importing Alembic or its migration scripts
(~0.25 s of every command's start-up).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text

from db.engine import get_engine

if TYPE_CHECKING:
    from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_REVISION = re.compile(r"""^(down_revision|revision)\s*(?::[^=]*)?=\s*(?:["']([^"']+)["']|None)""", re.M)


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["database_url"] = url
    return config


@cache
def head_revision() -> str:
    """The newest revision of the shipped migrations: the one no other revision builds on (read
    from the scripts' ``revision`` / ``down_revision`` lines; a test checks it against Alembic)."""
    revisions, parents = set(), set()
    for script in (MIGRATIONS_DIR / "versions").glob("*.py"):
        found = dict(_REVISION.findall(script.read_text()))
        revisions.add(found["revision"])
        parents.add(found.get("down_revision") or None)
    heads = revisions - parents
    if len(heads) != 1:
        raise RuntimeError(f"the migrations have {len(heads)} heads, not one: {sorted(heads)}")
    return heads.pop()


def schema_is_current(url: str) -> bool:
    """True when the database's schema is at :func:`head_revision` (nothing to migrate)."""
    with get_engine(url).connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return False
        versions = set(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return versions == {head_revision()}


def upgrade(url: str, revision: str = "head") -> None:
    if revision == "head" and schema_is_current(url):
        return
    from alembic import command

    command.upgrade(alembic_config(url), revision)
