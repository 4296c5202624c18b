"""The embedded path: register and score in this process, no broker needed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from worker.decode_pool import DecodePool
from worker.processing import Processor
from worker.scanner import CHUNK_FILES, ScanSummary, chunked, iter_files, register_chunk
from worker.settings import Settings

log = logging.getLogger(__name__)


def make_processor(settings: Settings, pool: DecodePool, *, retry_incomplete: bool = False) -> Processor:
    return Processor(
        settings.database_url,
        settings.resolved_model_dir(),
        pool,
        batch_size=settings.batch_size,
        lease_seconds=settings.lease_seconds,
        retry_incomplete=retry_incomplete,
    )


def scan_embedded(
    settings: Settings,
    roots: Iterable[str],
    *,
    follow_symlinks: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> ScanSummary:
    """Score every file under ``roots`` that is not scored yet; return what happened."""
    summary = ScanSummary()
    with DecodePool(settings.decode_workers) as pool:
        processor = make_processor(settings, pool)
        for files in chunked(iter_files(roots, follow_symlinks), CHUNK_FILES):
            summary.files += len(files)
            pending = register_chunk(settings.database_url, files, pool.hash_many, summary)
            if pending:
                summary.outcomes.update(processor.process(pending).counts)
            if on_progress:
                on_progress(len(files))
    return summary
