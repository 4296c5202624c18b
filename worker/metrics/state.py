"""Whether this process records metrics, and the metric definitions once loaded.

Shared by the hooks (:mod:`worker.metrics`) and the server (:mod:`worker.metrics.server`), which
both read it; neither imports the other for it.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
#: ``on``: this process records metrics; ``d``: :mod:`worker.metrics.definitions` once imported;
#: ``model``: a model was loaded in this process.
state: dict[str, Any] = {"on": bool(os.environ.get(MULTIPROC_VARIABLE)), "d": None}


def enabled() -> bool:
    return state["on"]


def enable() -> None:
    """Record metrics in this process (the process that serves them, or a web app mounting them)."""
    state["on"] = True


def multiprocess_dir() -> str | None:
    return os.environ.get(MULTIPROC_VARIABLE) or None


def definitions() -> ModuleType:
    """:mod:`worker.metrics.definitions`, imported on first use (after the environment is settled)."""
    loaded = state["d"]
    if loaded is None:
        from worker.metrics import definitions as loaded

        state["d"] = loaded
    return loaded
