"""The embedded path: register and score in this process, no broker needed."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from db import queue
from db.engine import session_scope
from worker.decode_pool import DecodePool
from worker.dicomnet.plan import results_plan
from worker.processing import Processor
from worker.scanner import CHUNK_FILES, ScanSummary, chunked, iter_files, register_chunk
from worker.settings import Settings, local_owner, local_owner_is_dead, local_owner_prefix

log = logging.getLogger(__name__)


def make_processor(settings: Settings, pool: DecodePool, *, retry_incomplete: bool = False) -> Processor:
    """In-process scoring; leases carry this process's id, so a retry re-takes them and a later run
    can tell they belong to a process that died."""
    return Processor(
        settings.database_url,
        settings.resolved_model_dir(),
        pool,
        batch_size=settings.batch_size,
        lease_seconds=settings.lease_seconds,
        retry_incomplete=retry_incomplete,
        owner=local_owner(),
        outbox_plan=results_plan(settings),
    )


def release_dead_local_leases(database_url: str) -> int:
    """Work claimed by an earlier scan or watch on this host that was killed goes back to the queue."""
    with session_scope(database_url) as session:
        released = queue.release_dead_owners(session, local_owner_prefix(), local_owner_is_dead)
    if released:
        log.info("resuming %d file(s) left unfinished by a process that stopped", len(released))
    return len(released)


def scan_embedded(
    settings: Settings,
    roots: Iterable[str],
    *,
    follow_symlinks: bool = False,
    on_progress: Callable[[int], None] | None = None,
) -> ScanSummary:
    """Score every file under ``roots`` that is not scored yet; return what happened."""
    summary = ScanSummary()
    release_dead_local_leases(settings.database_url)
    with DecodePool(settings.decode_processes) as pool:
        processor = make_processor(settings, pool)
        for files in chunked(iter_files(roots, follow_symlinks), CHUNK_FILES):
            summary.files += len(files)
            pending = register_chunk(
                settings.database_url, files, pool.hash_many, summary, owner=processor.default_owner
            )
            if pending:
                summary.outcomes.update(processor.process(pending).counts)
            if on_progress:
                on_progress(len(files))
    return summary
