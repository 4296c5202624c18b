"""How every command starts: one :class:`Settings` from flags, environment and file, logging to
stderr, and the database schema brought up to date, with a clear message and exit status 2 on a
bad setting or an unreachable database instead of a traceback."""

from __future__ import annotations

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

    try:
        upgrade(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - show a clear message instead of a traceback
        console.print(
            f"cannot open the database {masked(settings.database_url)}: {logs.describe_error(exc)}",
            markup=False,
        )
        raise typer.Exit(2) from exc


def database_settings(*, quiet: bool = False, **flags: Any) -> Settings:
    """:func:`command_settings`, then :func:`prepare_database`: for commands that use the database."""
    settings = command_settings(quiet=quiet, **flags)
    prepare_database(settings)
    return settings
