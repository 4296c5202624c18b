"""Enqueueing work for Celery workers, waiting for it, and recovering lost work."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from datetime import timedelta

from rich.console import Console
from sqlalchemy import select

from db import queue
from db.engine import session_scope
from db.schema import FINAL_STATUSES, Image
from worker.decode_pool import DecodePool
from worker.progress import progress_bar
from worker.scanner import CHUNK_FILES, ScanSummary, chunked, iter_files, register_chunk
from worker.settings import Settings

log = logging.getLogger(__name__)

TASK_NAME = "cxr_triage.score_images"


def enqueue(broker_url: str, image_ids: Sequence[int], batch_size: int = 32) -> int:
    """Send ``image_ids`` to the workers in batches; returns the number of messages."""
    from worker.celery_app import SCORE_QUEUE, app

    app.conf.broker_url = broker_url
    messages = 0
    for start in range(0, len(image_ids), batch_size):
        app.send_task(TASK_NAME, args=[list(image_ids[start : start + batch_size])], queue=SCORE_QUEUE)
        messages += 1
    return messages


def recover_lost_work(settings: Settings, stale_after_s: float) -> int:
    """Requeue images whose lease expired, and re-send queued images nobody has touched for a while.

    A message can be lost (Redis restarted without persistence) or its worker
    killed; the database still knows the image is unfinished, so it is sent
    again. A duplicate message is harmless.
    """
    from db.schema import utcnow

    with session_scope(settings.database_url) as session:
        expired = queue.requeue_expired(session)
        stale = queue.queued_ids(session, older_than=utcnow() - timedelta(seconds=stale_after_s))
        ids = sorted(set(expired) | set(stale))
        if ids:
            from sqlalchemy import update

            session.execute(update(Image).where(Image.id.in_(ids)).values(updated_at=utcnow()))
    if ids:
        log.info("re-sending %d unfinished image(s) (%d with an expired lease)", len(ids), len(expired))
        enqueue(settings.broker_url, ids, settings.batch_size)
    return len(ids)


def wait_until_final(
    settings: Settings,
    image_ids: Iterable[int],
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    on_progress=None,
) -> dict[str, int]:
    ids = list(image_ids)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        with session_scope(settings.database_url) as session:
            counts = {}
            for start in range(0, len(ids), 5000):
                for status, n in queue.status_counts(session, ids[start : start + 5000]).items():
                    counts[status] = counts.get(status, 0) + n
        done = sum(n for status, n in counts.items() if status in FINAL_STATUSES)
        if on_progress:
            on_progress(done)
        if done >= len(ids) or (deadline is not None and time.monotonic() > deadline):
            return counts
        time.sleep(poll_s)


def _not_in_flight(settings: Settings, pending: list[int], new_images: set[int]) -> list[int]:
    """New images, plus unfinished ones nobody has touched for a lease (their message may be lost).

    Images queued recently by an earlier run are already on their way: not sent twice.
    """
    from db.schema import utcnow

    older = [i for i in pending if i not in new_images]
    if not older:
        return pending
    cutoff = utcnow() - timedelta(seconds=settings.lease_seconds)
    with session_scope(settings.database_url) as session:
        stale = set(session.scalars(select(Image.id).where(Image.id.in_(older), Image.updated_at < cutoff)))
    return [i for i in pending if i in new_images or i in stale]


def scan_distributed(
    settings: Settings,
    roots: list[str],
    *,
    follow_symlinks: bool,
    wait: bool,
    progress: bool,
    console: Console,
) -> ScanSummary:
    """Register files and enqueue the unfinished ones in batches; optionally wait for them."""
    summary = ScanSummary()
    enqueued: list[int] = []
    unfinished: list[int] = []
    with DecodePool(settings.decode_processes) as pool, progress_bar(console, progress) as bar:
        task = bar.add_task("registering", total=None)
        for files in chunked(iter_files(roots, follow_symlinks), CHUNK_FILES):
            summary.files += len(files)
            pending = register_chunk(
                settings.database_url, files, pool.hash_many, summary, follow_symlinks=follow_symlinks
            )
            unfinished.extend(pending)
            to_send = _not_in_flight(settings, pending, summary.new_images)
            if to_send:
                enqueue(settings.broker_url, to_send, settings.batch_size)
                enqueued.extend(to_send)
            bar.advance(task, len(files))
        bar.update(task, total=summary.files)
        console.print(f"enqueued {len(enqueued)} image(s) for the workers")
        summary.outcomes["queued"] = len(unfinished)
        if wait and unfinished:
            wait_task = bar.add_task("waiting for workers", total=len(unfinished))
            counts = wait_until_final(
                settings, unfinished, on_progress=lambda d: bar.update(wait_task, completed=d)
            )
            summary.outcomes = Counter(counts)
    return summary
