"""The one seam between finding files and scoring them.

``scan`` and ``watch`` find files and register them (:func:`hand_on`); a
:class:`Submitter` then gets the ids of the images that need work. Two
implementations: :class:`InProcess` scores them here, :class:`ViaCelery` sends
them to the workers. Both also :meth:`~Submitter.recover` work that was lost
(a process killed while holding leases, a message that vanished).

Sending is bookkept in ``images.sent_at``: an image is sent when it was never sent
(a scan stopped by a broker outage sends the rest on its next run); re-sent only
when known lost: its lease expired, its worker died (the supervisor), or it is
still queued long after its message went out while the broker's queue is empty.
Only one process re-sends at a time (a Redis lock).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from db import queue
from db.engine import session_scope
from db.queue import FileSeen
from pipeline.model_folder import model_version
from worker import metrics
from worker.ingest.scanner import CHUNK_FILES, ScanSummary, chunked, files_to_read, iter_files, register_chunk
from worker.logs import describe_error
from worker.scoring.decode_pool import DecodePool, Predecoded
from worker.scoring.overlap import prefetched
from worker.settings import Settings, local_owner, local_owner_is_dead, local_owner_prefix

log = logging.getLogger(__name__)

TASK_NAME = "cxr_triage.score_images"
#: Chunks of files read (hashed and decoded) ahead of the one being registered and scored.
CHUNKS_READ_AHEAD = 1
#: A queued image whose message went out this long ago, with the broker's queue empty, was lost.
LOST_AFTER_S = 30.0
RESEND_LOCK = "cxr-triage:resend-lock"


def broker_errors() -> tuple[type[BaseException], ...]:
    """What a broker outage raises (Kombu when sending, redis-py for the lock and queue length).

    A function, so that a command without a broker never imports Kombu or redis-py (``except
    broker_errors()`` is evaluated only when something was raised)."""
    from kombu.exceptions import KombuError
    from redis.exceptions import RedisError

    return (KombuError, RedisError, OSError)


@dataclass
class Submitted:
    """What a submission did: outcomes by kind (``queued`` for sent work) and ids to retry shortly."""

    counts: Counter = field(default_factory=Counter)
    retry_later: list[int] = field(default_factory=list)
    #: The images handed on (registered and unfinished), for callers that wait for them.
    image_ids: list[int] = field(default_factory=list)


class Submitter(Protocol):
    #: Lease owner of work done in this process (None when the work is sent elsewhere).
    owner: str | None

    def submit(self, image_ids: Sequence[int], predecoded: Predecoded | None = None) -> Submitted:
        """Bring ``image_ids`` (registered, unfinished) towards a final state; ``predecoded`` holds
        decodes made while registering them, for a submitter that scores here."""
        ...

    def recover(self) -> Submitted:
        """Put lost work (dead leases, lost messages) back on its way."""
        ...


# -- in this process ------------------------------------------------------------------------------


class InProcess:
    """Scores in this process; leases carry this process's id, so a later run can tell they belong to
    a process that died."""

    def __init__(self, settings: Settings, pool: DecodePool, *, resume_all: bool = False) -> None:
        from worker.scoring.processing import Processor

        self.settings = settings
        self.owner = local_owner()
        #: Watch resumes every unfinished image; a scan only those under its own folders.
        self.resume_all = resume_all
        self.processor = Processor.from_settings(
            settings, pool, retry_incomplete=resume_all, owner=self.owner
        )

    def submit(self, image_ids: Sequence[int], predecoded: Predecoded | None = None) -> Submitted:
        outcome = self.processor.process(image_ids, predecoded=predecoded.prepared if predecoded else None)
        counts = Counter({str(kind): n for kind, n in outcome.counts.items()})  # plain names for logs
        return Submitted(counts, list(outcome.retry_later))

    def unreported(self) -> Counter:
        """Outcomes of the batches finished by a :meth:`submit` that was interrupted (Ctrl-C)."""
        return Counter({str(kind): n for kind, n in getattr(self.processor, "in_flight", Counter()).items()})

    def predecode(self, files: Sequence[FileSeen], pool: DecodePool) -> Predecoded | None:
        """Start reading the new or changed ``files`` once each in the decode pool, for registration
        and scoring alike (None: nothing to read, or no decode processes to read them in)."""
        if pool.workers <= 0:
            return None
        with session_scope(self.settings.database_url) as session:
            paths = files_to_read(session, files)
        if not paths:
            return None
        plan, scope = self.processor.decode_plan()  # from the metadata: no model load
        return pool.predecode(
            paths,
            plan,
            scope,
            self.settings.full_resolution_decode,
            follow_symlinks=self.settings.follow_symlinks,
        )

    def warm_up(self) -> None:
        """Load the model now (while the decode pool reads the first files)."""
        self.processor.scorer  # noqa: B018 - loads on first use

    def rescore_outdated(self, files: Sequence[FileSeen]) -> int:
        """Films among ``files`` scored by an older model get the current model's score (a new model
        version re-scores known films as their folders are scanned; resumable: the database knows
        which lack one)."""
        version = model_version(self.settings.resolved_model_dir())  # without loading the model
        if version is None:
            return 0
        with session_scope(self.settings.database_url) as session:
            known = queue.image_ids_at(session, (f.path for f in files))
            ids = queue.outdated_ids_among(session, version, known)
        size = self.settings.batch_size
        return sum(self.processor.rescore(ids[start : start + size]) for start in range(0, len(ids), size))

    def recover(self) -> Submitted:
        with session_scope(self.settings.database_url) as session:
            released = queue.release_dead_owners(session, local_owner_prefix(), local_owner_is_dead)
            expired = queue.requeue_expired(session)
            leftover = queue.queued_ids(session) if self.resume_all else []
        if released or expired:
            stopped = len(released) + len(expired)
            log.info("resuming %d file(s) left unfinished by a process that stopped", stopped)
        if not leftover:
            return Submitted()
        log.info("resuming %d unfinished file(s) from an earlier run", len(leftover))
        return self.submit(leftover)


# -- through the broker ---------------------------------------------------------------------------


def send_batches(settings: Settings, image_ids: Sequence[int], countdown: float | None = None) -> int:
    """Send ``image_ids`` to the workers in batches, recording when each went; returns messages sent.

    A batch is marked sent only after the broker took it: if the broker fails half-way, the rest
    stays unsent and a later run (or the re-sender) sends it.
    """
    from worker.queue.celery_app import SCORE_QUEUE, configure

    app = configure(settings)
    ids = list(image_ids)
    messages = 0
    for start in range(0, len(ids), settings.batch_size):
        batch = ids[start : start + settings.batch_size]
        app.send_task(TASK_NAME, args=[batch], queue=SCORE_QUEUE, countdown=countdown)
        with session_scope(settings.database_url) as session:
            queue.mark_sent(session, batch)
        messages += 1
    return messages


RESCORE_TASK_NAME = "cxr_triage.rescore_images"


def send_rescore(settings: Settings, image_ids: Sequence[int]) -> int:
    """Ask the workers to add the current model's score to already scored films."""
    from worker.queue.celery_app import SCORE_QUEUE, configure

    app = configure(settings)
    ids = list(image_ids)
    for start in range(0, len(ids), settings.batch_size):
        app.send_task(RESCORE_TASK_NAME, args=[ids[start : start + settings.batch_size]], queue=SCORE_QUEUE)
    return len(ids)


def _redis(settings: Settings):
    import redis

    return redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=10)


def broker_backlog(settings: Settings) -> int:
    """Messages waiting in the broker's score queue (each Kombu priority level is its own list)."""
    from worker.queue.celery_app import SCORE_QUEUE

    client = _redis(settings)
    keys = [SCORE_QUEUE, *client.scan_iter(match=SCORE_QUEUE + "\x06\x16*")]
    return sum(int(client.llen(key)) for key in keys)


class resend_lock:  # noqa: N801 - used as a context manager
    """One re-sender at a time across supervisors and watchers (Redis SET NX with expiry)."""

    def __init__(self, settings: Settings, ttl_s: int = 120) -> None:
        self.client = _redis(settings)
        self.token = uuid.uuid4().hex
        self.ttl_s = ttl_s
        self.held = False

    def __enter__(self) -> bool:
        self.held = bool(self.client.set(RESEND_LOCK, self.token, nx=True, ex=self.ttl_s))
        return self.held

    def __exit__(self, *exc_info) -> None:
        if self.held and self.client.get(RESEND_LOCK) == self.token.encode():
            self.client.delete(RESEND_LOCK)


class ViaCelery:
    """Sends work to Celery workers; what they did is read back from the database."""

    owner = None

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def submit(self, image_ids: Sequence[int], predecoded: Predecoded | None = None) -> Submitted:
        with session_scope(self.settings.database_url) as session:
            unsent = queue.never_sent(session, image_ids)
        if unsent:
            send_batches(self.settings, unsent)
            log.info("queued %d file(s) for the workers", len(unsent))
        return Submitted(Counter({"queued": len(unsent)}) if unsent else Counter())

    def recover(self) -> Submitted:
        """Re-send what is known lost; nothing while another process holds the re-send lock."""
        with resend_lock(self.settings) as held:
            if not held:
                return Submitted()
            with session_scope(self.settings.database_url) as session:
                expired = queue.requeue_expired(session)
            lost: list[int] = []
            if broker_backlog(self.settings) == 0:
                with session_scope(self.settings.database_url) as session:
                    cutoff = queue.db_now(session) - timedelta(seconds=LOST_AFTER_S)
                    lost = queue.lost_ids(session, sent_before=cutoff)
            ids = sorted(set(expired) | set(lost))
            if ids:
                log.info("re-sending %d lost image(s) (%d with an expired lease)", len(ids), len(expired))
                send_batches(self.settings, ids)
                metrics.resent(len(ids))
        return Submitted(Counter({"queued": len(ids)}) if ids else Counter())


def make_submitter(settings: Settings, pool: DecodePool, *, resume_all: bool = False) -> Submitter:
    """The broker's submitter when one is configured, else scoring in this process."""
    if settings.broker_url:
        return ViaCelery(settings)
    return InProcess(settings, pool, resume_all=resume_all)


# -- the one register-and-submit loop -------------------------------------------------------------


def start_reading(files: list[FileSeen], pool: DecodePool, submitter: Submitter) -> Predecoded | None:
    """Start the one read of ``files`` that both registers and (scoring here) decodes them."""
    return submitter.predecode(files, pool) if isinstance(submitter, InProcess) else None


def hand_on(
    settings: Settings,
    files: list[FileSeen],
    pool: DecodePool,
    submitter: Submitter,
    summary: ScanSummary,
    predecoded: Predecoded | None = None,
) -> Submitted:
    """Register ``files`` (hashing what changed) and submit the images that need work.

    Scoring in this process, each new file is read once (:func:`start_reading`): the read that
    hashes it for registration also decodes it. ``predecoded`` is that read started earlier
    (``scan`` starts chunk k+1's while chunk k is scored)."""
    if predecoded is None:
        predecoded = start_reading(files, pool, submitter)
    pending = register_chunk(
        settings.database_url,
        files,
        predecoded.hasher if predecoded is not None else pool.hash_many,
        summary,
        owner=submitter.owner,
        follow_symlinks=settings.follow_symlinks,
    )
    summary.files += len(files)
    if isinstance(submitter, InProcess):  # with a broker, the workers' supervisor re-scores
        submitter.rescore_outdated(files)
    if not pending:
        return Submitted()
    submitted = submitter.submit(pending, predecoded)
    submitted.image_ids = pending
    summary.outcomes.update(submitted.counts)
    return submitted


def scan(
    settings: Settings,
    roots: Iterable[str],
    submitter: Submitter,
    pool: DecodePool,
    *,
    on_progress: Callable[[int], None] | None = None,
    handed_on: list[int] | None = None,
    summary: ScanSummary | None = None,
) -> ScanSummary:
    """Register and submit every file under ``roots``, chunk by chunk (constant memory); the ids
    handed on are appended to ``handed_on`` when given (``scan --wait`` waits for them). The counts
    go into ``summary`` when given, so that a caller interrupted (Ctrl-C) still has them."""
    summary = summary if summary is not None else ScanSummary()
    try:
        submitter.recover()
    except broker_errors() as exc:  # sending below will say so clearly if the broker is really gone
        log.warning("could not check for lost work (%s)", describe_error(exc))
    chunks = chunked(iter_files(roots, settings.follow_symlinks), CHUNK_FILES)
    started = ((files, start_reading(files, pool, submitter)) for files in chunks)
    # The next chunk's files are read while this one is registered and scored; the model loads
    # (once there is something to score) while the first chunks are read.
    for files, predecoded in prefetched(started, ahead=CHUNKS_READ_AHEAD):
        if predecoded is not None and isinstance(submitter, InProcess):
            submitter.warm_up()
        submitted = hand_on(settings, files, pool, submitter, summary, predecoded)
        if handed_on is not None:
            handed_on.extend(submitted.image_ids)
        if on_progress:
            on_progress(len(files))
    return summary


def wait_until_final(
    settings: Settings, image_ids: Iterable[int], poll_s: float = 1.0, on_progress=None
) -> dict[str, int]:
    """Poll the database until every image in ``image_ids`` is final; returns counts by status."""
    from db.schema import FINAL_STATUSES

    ids = list(image_ids)
    while True:
        counts: Counter = Counter()
        with session_scope(settings.database_url) as session:
            for start in range(0, len(ids), 5000):
                counts.update(queue.status_counts(session, ids[start : start + 5000]))
        done = sum(n for status, n in counts.items() if status in FINAL_STATUSES)
        if on_progress:
            on_progress(done)
        if done >= len(ids):
            return dict(counts)
        time.sleep(poll_s)
