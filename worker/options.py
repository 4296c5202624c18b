"""Command-line options shared by more than one command module (one definition each)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

ModelDir = Annotated[
    Path | None,
    typer.Option(
        "--model-dir",
        envvar="CXR_TRIAGE_MODEL_DIR",
        show_envvar=True,
        help="Model folder (metadata.json + weights). Default: the shipped model.",
    ),
]
