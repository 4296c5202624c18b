"""Logging set-up. Log lines name files by a short content hash, never by patient data."""

from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler

LOG_FORMAT = "%(message)s"


def configure(level: str = "INFO") -> None:
    """Log lines go to standard error, always: standard output is for data (worklist JSON, CSV)."""
    level = (level or "INFO").upper()
    handler = RichHandler(
        console=Console(stderr=True), show_path=False, rich_tracebacks=False, markup=False
    )
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    # Third-party loggers may quote header values (patient names, UIDs); keep them quiet.
    for noisy in ("pydicom", "PIL", "h5py", "absl", "tensorflow", "celery.redirected"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if level != "DEBUG":  # schema migrations: say nothing unless asked
        logging.getLogger("alembic").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow C++ start-up chatter


def short(sha256: str | None) -> str:
    return (sha256 or "?")[:12]


def describe_error(exc: BaseException) -> str:
    """First line of a driver's message ("database or disk is full"), never SQL parameters (paths)."""
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).splitlines() or [""])[0][:200]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
