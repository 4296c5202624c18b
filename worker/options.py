"""Command-line options shared by the command modules: each is made from :class:`Settings`, so its
flag, help, environment variable and default are defined once, there."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from worker.settings import Settings, env_name, flag_name


def setting(name: str, *aliases: str, **extra: Any) -> Any:
    """A command-line option for the setting ``name``: its flag, help, variable and default come from
    :class:`Settings` (the option is None when not given, so the environment and defaults apply)."""
    info = Settings.model_fields[name]
    if info.default_factory is not None:
        default = ""
    elif isinstance(info.default, bool):
        default = f"; default: {'on' if info.default else 'off'}"
    else:
        default = f"; default: {'none' if info.default is None else info.default}"
    flags = [flag_name(name), *aliases]
    if info.annotation is bool:
        flags = [f"{flag_name(name)}/--no-{flag_name(name)[2:]}", *aliases]
    return typer.Option(*flags, help=f"{info.description} \\[env var: {env_name(name)}{default}]", **extra)


ModelDir = Annotated[Path | None, setting("model_dir")]
