"""The embedded path as one call: register and score in this process, no broker needed.

A thin wrapper over :mod:`worker.queue.submit` (``scan`` without a broker takes the same path).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from worker.ingest.scanner import ScanSummary
from worker.queue.submit import InProcess, scan
from worker.scoring.decode_pool import DecodePool
from worker.settings import Settings


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
