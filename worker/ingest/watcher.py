"""Watch drop folders and hand complete files to scoring.

A file is taken when it is complete: on close-after-write (inotify
IN_CLOSE_WRITE) or a rename into place, else once its size and mtime have been
stable for ``stable_seconds`` (network shares seen through polling give no close
events). Temporary names (``*.part``, ``*.tmp``, dotfiles) wait until renamed.
Events are lost in practice (queue overflow, restarts), so the folders are
rescanned on start and every ``rescan_interval`` seconds; the rescan skips known
files without reading them. Two cases cannot wait that long: a drop folder that was
missing (renamed away, share unmounted) and is back is rescanned at once (files that
arrived meanwhile gave no usable event), and files that could not be read now are
looked at again after ``UNREADABLE_RETRY_S``, doubling while some stay unreadable.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue as thread_queue
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from db import queue
from db.engine import session_scope
from db.queue import FileSeen
from worker.ingest.scanner import ScanSummary, is_temporary, iter_files
from worker.logs import describe_error
from worker.queue.submit import InProcess, Submitter, broker_errors, hand_on, make_submitter
from worker.scoring.decode_pool import DecodePool
from worker.settings import Settings

#: First wait before a rescan for files that could not be read now (doubles up to rescan_interval).
UNREADABLE_RETRY_S = 10.0

log = logging.getLogger(__name__)


@dataclass
class WatchOptions:
    polling: bool = False
    stable_seconds: float = 2.0
    batch_wait_seconds: float = 0.5
    rescan_interval: float = 300.0
    poll_interval: float = 1.0
    follow_symlinks: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> WatchOptions:
        return cls(
            polling=settings.polling,
            stable_seconds=settings.stable_seconds,
            batch_wait_seconds=settings.batch_wait,
            rescan_interval=settings.rescan_interval,
            follow_symlinks=settings.follow_symlinks,
        )


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
    options: WatchOptions | None = None

    def __post_init__(self) -> None:
        if self.options is None:
            self.options = WatchOptions.from_settings(self.settings)
        self.events: thread_queue.Queue = thread_queue.Queue()
        self.candidates: dict[str, _Candidate] = {}
        self.ready: dict[str, float] = {}
        self.stop_event = threading.Event()
        self.summary = ScanSummary()
        self.backoff_s = 0.0
        self.missing_roots: set[str] = set()
        self.unreadable_seen = 0  # summary.unreadable already answered with an early rescan
        self.unreadable_at_rescan = 0  # summary.unreadable at the last rescan
        self.unreadable_retry_s = UNREADABLE_RETRY_S

    # -- event intake ---------------------------------------------------------------------------
    def _observe(self, path: str, complete: bool) -> None:
        if self._ignored(path):
            return
        info = self._regular_stat(path)
        if info is None:  # gone, or a link (when not followed), FIFO, socket or folder
            self.candidates.pop(path, None)
            return
        now = time.monotonic()
        known = self.candidates.get(path)
        if known is None or (known.size, known.mtime_ns) != (info.st_size, info.st_mtime_ns):
            known = _Candidate(info.st_size, info.st_mtime_ns, now)
            self.candidates[path] = known
        known.complete = known.complete or complete

    def _regular_stat(self, path: str) -> os.stat_result | None:
        """The file's stat if it is a regular file now (lstat unless links are followed), else None.

        Asked at every step (event, promotion, hand-off), not only on the first event: a
        file can be swapped for a symlink to outside the drop folder, or for a FIFO.
        """
        try:
            info = os.stat(path, follow_symlinks=self.options.follow_symlinks)
        except OSError:
            return None
        return info if stat.S_ISREG(info.st_mode) else None

    def _ignored(self, path: str) -> bool:
        """Outside the roots, or a temporary name anywhere below a root (``.incoming/x.dcm``), as in scan."""
        real = os.path.abspath(path)
        for root in self.roots:
            base = root.rstrip(os.sep) + os.sep
            if real.startswith(base):
                return any(is_temporary(part) for part in real[len(base) :].split(os.sep))
        return True

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
            info = self._regular_stat(path)
            if info is None:
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

    def _root_came_back(self) -> bool:
        """True when a root that was missing is a folder again (checked every loop: one stat per root)."""
        back = False
        for root in self.roots:
            if os.path.isdir(root):
                back = back or root in self.missing_roots
                self.missing_roots.discard(root)
            else:
                self.missing_roots.add(root)
        return back

    def _retry_unreadable(self, next_rescan: float) -> float:
        """The next rescan, brought forward when files could not be read now (a share that
        hiccupped, a folder moved away while it was hashed): after 10 s, doubling while it recurs."""
        if self.summary.unreadable == self.unreadable_seen:
            return next_rescan
        self.unreadable_seen = self.summary.unreadable
        wait = self.unreadable_retry_s
        self.unreadable_retry_s = min(wait * 2, self.options.rescan_interval)
        return min(next_rescan, time.monotonic() + wait)

    # -- hand-off ---------------------------------------------------------------------------------
    def _due(self) -> bool:
        if not self.ready:
            return False
        oldest = min(self.ready.values())
        return len(self.ready) >= self.settings.batch_size or (
            time.monotonic() - oldest >= self.options.batch_wait_seconds
        )

    def _still_regular(self, paths: list[str]) -> list[FileSeen]:
        """Those of ``paths`` that are still regular files, as seen now (the hash re-checks on its fd)."""
        files = []
        for path in paths:
            info = self._regular_stat(path)
            if info is not None:
                files.append(FileSeen(path, info.st_size, info.st_mtime_ns))
        return files

    def _flush(self, pool: DecodePool, submitter: Submitter) -> None:
        paths = sorted(self.ready, key=self.ready.get)[: self.settings.batch_size * 4]
        for path in paths:
            del self.ready[path]
        files = self._still_regular(paths)
        submitted = hand_on(self.settings, files, pool, submitter, self.summary)
        if submitted.counts:
            log.info("handed on %d file(s): %s", len(submitted.image_ids), dict(submitted.counts))
        if submitted.retry_later:
            with session_scope(self.settings.database_url) as session:
                for paths_of in queue.source_paths(session, submitted.retry_later).values():
                    for path in paths_of:
                        self._observe(path, complete=False)

    def _recover(self, submitter: Submitter) -> None:
        self.summary.outcomes.update(submitter.recover().counts)

    @contextlib.contextmanager
    def _outage_guard(self, what: str):
        """Database or broker down: log, back off, and let the loop try again (nothing is dropped)."""
        try:
            yield
            self.backoff_s = 0.0
        except (SQLAlchemyError, *broker_errors()) as exc:
            self.backoff_s = min(max(self.backoff_s * 2, 1.0), 30.0)
            log.warning("%s failed (%s); retrying in %.0f s", what, describe_error(exc), self.backoff_s)
            self.stop_event.wait(self.backoff_s)

    def _flush_safely(self, pool: DecodePool, submitter: Submitter) -> bool:
        batch = dict(self.ready)
        with self._outage_guard("handing files on"):
            self._flush(pool, submitter)
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
        next_rescan = -float("inf")
        with DecodePool(self.settings.decode_processes) as pool:
            pool.start()  # the decode processes start while the model loads, not at the first film
            submitter = make_submitter(self.settings, pool, resume_all=True)
            if isinstance(submitter, InProcess):
                submitter.processor.scorer  # load the model now, not when the first film arrives  # noqa: B018
            try:
                while not self.stop_event.is_set():
                    if self._root_came_back():
                        log.info("a watched folder is back; rescanning it now")
                        next_rescan = -float("inf")
                    if time.monotonic() >= next_rescan:
                        with self._outage_guard("reconciliation"):
                            self._recover(submitter)
                            self.rescan()
                            if self.summary.unreadable == self.unreadable_at_rescan:
                                self.unreadable_retry_s = UNREADABLE_RETRY_S  # all read since last time
                            self.unreadable_at_rescan = self.summary.unreadable
                            next_rescan = time.monotonic() + self.options.rescan_interval
                    self._drain_events()
                    self._promote_stable()
                    while self._due() and not self.stop_event.is_set():
                        if not self._flush_safely(pool, submitter):
                            break
                    next_rescan = self._retry_unreadable(next_rescan)
                    if max_seconds is not None and time.monotonic() - started >= max_seconds:
                        break
                    self.stop_event.wait(0.1)
            finally:
                observer.stop()
                observer.join(timeout=5)
        return self.summary
