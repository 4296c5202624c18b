"""Command-line options shared by the command modules: each is made from :class:`Settings`, so its
flag, help, environment variable and default are defined once, there."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from worker.settings import Settings, env_name, flag_name

R = TypeVar("R")


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


def data_dir_of(given: Path | None) -> Path:
    """The data folder from the argument, else from the settings; a clear error when neither (the
    ``model`` commands and ``model fit-ood`` resolve it alike)."""
    found = given or Settings().data_dir
    if found is None:
        raise typer.BadParameter("give the data folder or set CXR_TRIAGE_DATA_DIR", param_hint="DATA_DIR")
    if not (found / "NORMAL").is_dir() and not (found / "PNEUMONIA").is_dir():
        raise typer.BadParameter(f"{found} has no NORMAL/ or PNEUMONIA/ folder", param_hint="DATA_DIR")
    return found


def with_options(options: dict[str, Any]) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Give a command the shared ``options`` (parameter name -> annotated option type, each None by
    default) after its own parameters, so several commands declare them once; the command takes them in
    its ``**kwargs``. Typer reads the options from the command's signature, which this extends."""

    def decorate(command: Callable[..., R]) -> Callable[..., R]:
        own = inspect.signature(command, eval_str=True)
        params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        params += [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
            for name, annotation in options.items()
        ]

        @functools.wraps(command)
        def run(**kwargs: Any) -> R:
            return command(**kwargs)

        run.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
        return run

    return decorate
