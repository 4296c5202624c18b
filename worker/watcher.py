"""Watch drop folders and hand complete files to scoring.

A file is taken when it is complete: on close-after-write (inotify
IN_CLOSE_WRITE) or a rename into place, else once its size and mtime have been
stable for ``stable_seconds`` (network shares seen through polling give no close
events). Temporary names (``*.part``, ``*.tmp``, dotfiles) wait until renamed.
Events are lost in practice (queue overflow, restarts), so the folders are
rescanned on start and every ``rescan_interval`` seconds; the rescan skips known
files without reading them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as thread_queue
import stat
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kombu.exceptions import KombuError
from sqlalchemy.exc import SQLAlchemyError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from db import queue
from db.engine import session_scope
from db.queue import FileSeen
from worker import metrics
from worker.decode_pool import DecodePool
from worker.logs import describe_error
from worker.scanner import ScanSummary, is_temporary, iter_files, register_chunk
from worker.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class WatchOptions:
    polling: bool = False
    stable_seconds: float = 2.0
    batch_wait_seconds: float = 0.5
    rescan_interval: float = 300.0
    poll_interval: float = 1.0
    follow_symlinks: bool = False


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    complete: bool = False


class _Events(FileSystemEventHandler):
    """Turns watchdog events into (path, complete?) items on a thread-safe queue."""

    def __init__(self, sink: thread_queue.Queue) -> None:
        self.sink = sink

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        if event.event_type == "moved":
            self.sink.put((os.fsdecode(event.dest_path), True))
        elif event.event_type == "closed":
            self.sink.put((os.fsdecode(event.src_path), True))
        elif event.event_type in ("created", "modified"):
            self.sink.put((os.fsdecode(event.src_path), False))


@dataclass
class Watcher:
    settings: Settings
    roots: list[str]
    options: WatchOptions = field(default_factory=WatchOptions)

    def __post_init__(self) -> None:
        self.events: thread_queue.Queue = thread_queue.Queue()
        self.candidates: dict[str, _Candidate] = {}
        self.ready: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.summary = ScanSummary()
        self.backoff_s = 0.0

    # -- event intake ---------------------------------------------------------------------------
    def _observe(self, path: str, complete: bool) -> None:
        if is_temporary(os.path.basename(path)) or not self._inside_roots(path):
            return
        try:
            info = os.stat(path, follow_symlinks=self.options.follow_symlinks)
        except OSError:
            self.candidates.pop(path, None)
            return
        if not stat.S_ISREG(info.st_mode):  # a link (when not followed), FIFO, socket or folder
            return
        now = time.monotonic()
        known = self.candidates.get(path)
        if known is None or (known.size, known.mtime_ns) != (info.st_size, info.st_mtime_ns):
            known = _Candidate(info.st_size, info.st_mtime_ns, now)
            self.candidates[path] = known
        known.complete = known.complete or complete

    def _inside_roots(self, path: str) -> bool:
        real = os.path.abspath(path)
        return any(real == root or real.startswith(root.rstrip(os.sep) + os.sep) for root in self.roots)

    def _drain_events(self) -> None:
        while True:
            try:
                path, complete = self.events.get_nowait()
            except thread_queue.Empty:
                return
            self._observe(path, complete)

    def _promote_stable(self) -> None:
        now = time.monotonic()
        for path, candidate in list(self.candidates.items()):
            try:
                info = os.stat(path)
            except OSError:
                del self.candidates[path]
                continue
            if (info.st_size, info.st_mtime_ns) != (candidate.size, candidate.mtime_ns):
                self.candidates[path] = _Candidate(info.st_size, info.st_mtime_ns, now)
                continue
            if candidate.complete or now - candidate.stable_since >= self.options.stable_seconds:
                del self.candidates[path]
                self.ready.setdefault(path, now)

    def rescan(self) -> None:
        """Reconcile: every file under the roots not yet known is treated as a new arrival."""
        for seen in iter_files(self.roots, self.options.follow_symlinks):
            self._observe(seen.path, complete=False)

    # -- hand-off ---------------------------------------------------------------------------------
    def _due(self) -> bool:
        if not self.ready:
            return False
        oldest = min(self.ready.values())
        return len(self.ready) >= self.settings.batch_size or (
            time.monotonic() - oldest >= self.options.batch_wait_seconds
        )

    def _flush(self, pool: DecodePool, processor) -> None:
        paths = sorted(self.ready, key=self.ready.get)[: self.settings.batch_size * 4]
        for path in paths:
            del self.ready[path]
        files = []
        for path in paths:
            try:
                info = os.stat(path)
            except OSError:
                continue
            files.append(FileSeen(path, info.st_size, info.st_mtime_ns))
        owner = processor.default_owner if processor is not None else None
        pending = register_chunk(self.settings.database_url, files, pool.hash_many, self.summary, owner=owner)
        self.summary.files += len(files)
        if not pending:
            return
        if processor is None:
            from worker.distributed import enqueue

            enqueue(self.settings.broker_url, pending, self.settings.batch_size)
            log.info("queued %d file(s) for the workers", len(pending))
            return
        outcome = processor.process(pending)
        self.summary.outcomes.update(outcome.counts)
        log.info("processed %d file(s): %s", len(pending) - len(outcome.retry_later), dict(outcome.counts))
        if outcome.retry_later:
            with session_scope(self.settings.database_url) as session:
                for paths_of in queue.source_paths(session, outcome.retry_later).values():
                    for path in paths_of:
                        self._observe(path, complete=False)

    def _recover(self, processor) -> None:
        if processor is None:
            from worker.distributed import recover_lost_work

            metrics.resent(recover_lost_work(self.settings, stale_after_s=self.settings.lease_seconds))
            return
        from worker.embedded import release_dead_local_leases

        release_dead_local_leases(self.settings.database_url)
        with session_scope(self.settings.database_url) as session:
            queue.requeue_expired(session)
            leftover = queue.queued_ids(session)
        if leftover:
            log.info("resuming %d unfinished file(s) from an earlier run", len(leftover))
            self.summary.outcomes.update(processor.process(leftover).counts)

    @contextlib.contextmanager
    def _outage_guard(self, what: str):
        """Database or broker down: log, back off, and let the loop try again (nothing is dropped)."""
        try:
            yield
            self.backoff_s = 0.0
        except (SQLAlchemyError, OSError, KombuError) as exc:
            self.backoff_s = min(max(self.backoff_s * 2, 1.0), 30.0)
            log.warning("%s failed (%s); retrying in %.0f s", what, describe_error(exc), self.backoff_s)
            self.stop_event.wait(self.backoff_s)

    def _flush_safely(self, pool: DecodePool, processor) -> bool:
        batch = dict(self.ready)
        with self._outage_guard("handing files on"):
            self._flush(pool, processor)
            return True
        for path, since in batch.items():  # put the batch back: it is retried after the backoff
            self.ready.setdefault(path, since)
        return False

    # -- main loop --------------------------------------------------------------------------------
    def run(self, max_seconds: float | None = None) -> ScanSummary:
        observer = PollingObserver(timeout=self.options.poll_interval) if self.options.polling else Observer()
        handler = _Events(self.events)
        for root in self.roots:
            Path(root).mkdir(parents=True, exist_ok=True)
            observer.schedule(handler, root, recursive=True)
        observer.start()
        log.info("watching %d folder(s)%s", len(self.roots), " by polling" if self.options.polling else "")
        started = time.monotonic()
        last_rescan = -float("inf")
        with DecodePool(self.settings.decode_processes) as pool:
            processor = None
            if not self.settings.broker_url:
                from worker.embedded import make_processor

                processor = make_processor(self.settings, pool, retry_incomplete=True)
                processor.scorer  # load the model now, not when the first film arrives  # noqa: B018
            try:
                while not self.stop_event.is_set():
                    if time.monotonic() - last_rescan >= self.options.rescan_interval:
                        with self._outage_guard("reconciliation"):
                            self._recover(processor)
                            self.rescan()
                            last_rescan = time.monotonic()
                    self._drain_events()
                    self._promote_stable()
                    while self._due() and not self.stop_event.is_set():
                        if not self._flush_safely(pool, processor):
                            break
                    if max_seconds is not None and time.monotonic() - started >= max_seconds:
                        break
                    self.stop_event.wait(0.1)
            finally:
                observer.stop()
                observer.join(timeout=5)
        return self.summary
