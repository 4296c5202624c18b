"""The embedded path as one call: register and score in this process, no broker needed.

A thin wrapper over :mod:`worker.submit` (``scan`` without a broker takes the same path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from worker.decode_pool import DecodePool
from worker.scanner import ScanSummary
from worker.settings import Settings
from worker.submit import InProcess, scan


def scan_embedded(
    settings: Settings,
    roots: Iterable[str],
    *,
    follow_symlinks: bool | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ScanSummary:
    """Score every file under ``roots`` that is not scored yet; return what happened."""
    if follow_symlinks is not None:
        settings = settings.with_changes(follow_symlinks=follow_symlinks)
    with DecodePool(settings.decode_processes) as pool:
        return scan(settings, roots, InProcess(settings, pool), pool, on_progress=on_progress)
