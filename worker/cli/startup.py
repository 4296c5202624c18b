"""How every command starts: one :class:`Settings` from flags, environment and file, logging to
stderr, and the database schema brought up to date, with a clear message and exit status 2 on a
bad setting or an unreachable database instead of a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from db.engine import masked
from worker import logs
from worker.settings import Settings, env_name, flag_name

console = Console(stderr=True, soft_wrap=True)


def flags_of(given: dict[str, Any]) -> dict[str, Any]:
    """The command's parameters that are settings (by name), for :func:`command_settings`."""
    return {name: value for name, value in given.items() if name in Settings.model_fields}


def command_settings(*, quiet: bool = False, **flags: Any) -> Settings:
    """Build this process's one :class:`Settings` (flags over environment over file over defaults)
    and set up logging to stderr. ``quiet`` commands log warnings only unless a level is set."""
    from pydantic import ValidationError

    try:
        settings = Settings.build(**{k: (None if v == "" else v) for k, v in flags.items()})
    except ValidationError as exc:
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            console.print(
                f"invalid setting {flag_name(field)} / {env_name(field)}: {error['msg']}", markup=False
            )
        raise typer.Exit(2) from None
    level = "WARNING" if quiet and "log_level" not in settings.model_fields_set else settings.log_level
    logs.configure(level)
    return settings


def prepare_database(settings: Settings) -> None:
    """Create or upgrade the schema (Alembic); cheap when it is already current."""
    from db.migrate import upgrade

    _refuse_postgres_scheme(settings.database_url)
    try:
        upgrade(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - show a clear message instead of a traceback
        console.print(
            f"cannot open the database {masked(settings.database_url)}: {logs.describe_error(exc)}",
            markup=False,
        )
        raise typer.Exit(2) from exc


def _refuse_postgres_scheme(url: str) -> None:
    """``postgres://`` (Heroku's and libpq's spelling) names no SQLAlchemy driver: say what to write."""
    if url.split("://", 1)[0].lower() in ("postgres", "postgres+psycopg"):
        console.print(
            f"cannot open the database {masked(url)}: write postgresql+psycopg:// instead of postgres://",
            markup=False,
        )
        raise typer.Exit(2)


def require_existing_database(settings: Settings) -> None:
    """A command that only reads (worklist, audit, outbox list, model calibrations) never creates a
    database: a SQLite file that does not exist is a mistyped URL or path, said in one line (exit 2).
    A PostgreSQL database that does not exist already fails to connect."""
    from sqlalchemy.engine import make_url

    _refuse_postgres_scheme(settings.database_url)
    try:
        url = make_url(settings.database_url)
    except Exception:  # noqa: BLE001 - prepare_database reports an unparsable URL
        return
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return
    if url.database.startswith("file:"):  # a SQLite URI: its own rules
        return
    if not Path(url.database).is_file():
        console.print(
            f"no database at {masked(settings.database_url)}: the file does not exist (nothing was "
            "created); check --database-url / CXR_TRIAGE_DATABASE_URL, or scan or watch first",
            markup=False,
        )
        raise typer.Exit(2)


def database_settings(*, quiet: bool = False, read_only: bool = False, **flags: Any) -> Settings:
    """:func:`command_settings`, then :func:`prepare_database`: for commands that use the database.
    ``read_only`` commands refuse a database that does not exist (:func:`require_existing_database`)."""
    settings = command_settings(quiet=quiet, **flags)
    if read_only:
        require_existing_database(settings)
    prepare_database(settings)
    return settings
