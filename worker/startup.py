"""How every command starts: one :class:`Settings` from flags, environment and file, logging to
stderr, and the database schema brought up to date, with a clear message and exit status 2 on a
bad setting or an unreachable database instead of a traceback."""

from __future__ import annotations

import importlib
import importlib.abc
import sys
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


def configure_pydicom_on_import() -> None:
    """Give this process pydicom's process-wide settings (:func:`pipeline.dicom.configure_pydicom`)
    before its first DICOM read, without loading pydicom at start.

    Called by the process entry (``cxr-triage``'s ``main``). Most commands never read DICOM in this
    process (``scan`` decodes in its children, which configure themselves), and pydicom with what it
    pulls in is ~15 MiB; so the settings are applied right after whichever module imports pydicom
    first here (the decoder, the outbox sender, the DICOM listener, model tooling), or at once if it is
    imported already.
    """
    if "pydicom" in sys.modules:
        from pipeline.dicom import configure_pydicom

        configure_pydicom()
    elif not any(isinstance(finder, _PydicomSettings) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PydicomSettings())


class _PydicomSettings(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it lets the other finders find ``pydicom`` and ``pipeline.dicom``, and
    configures pydicom as soon as it is loaded (when ``pipeline.dicom`` is the importer, as soon as
    ``pipeline.dicom`` is); then it removes itself."""

    WATCHED = ("pydicom", "pipeline.dicom")

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in self.WATCHED:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    self._after_exec(spec.loader, fullname)
                return spec
        return None

    def _after_exec(self, loader, fullname: str) -> None:
        exec_module = loader.exec_module

        def exec_then_configure(module) -> None:
            exec_module(module)
            if fullname == "pipeline.dicom":
                self._configure(module)
            elif "pipeline.dicom" not in sys.modules:  # else pipeline.dicom imports pydicom: wait for it
                self._configure(importlib.import_module("pipeline.dicom"))

        loader.exec_module = exec_then_configure

    def _configure(self, dicom_module) -> None:
        if self in sys.meta_path:  # once
            sys.meta_path.remove(self)
            dicom_module.configure_pydicom()
