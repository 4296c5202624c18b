"""Walk folders, register files by content hash, and hand new work to a sink.

Constant memory: files are streamed in chunks; a file already registered with
the same path, size and mtime is skipped without being read. A killed scan
resumes where it stopped: registered-but-unscored images are picked up again.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from db import queue
from db.engine import session_scope
from db.queue import FileSeen
from db.schema import ImageStatus
from pipeline.limits import MAX_FILE_BYTES
from worker import metrics

log = logging.getLogger(__name__)

#: Names that belong to files still being copied or to editors; picked up once renamed.
TEMPORARY_PATTERNS = ("*.part", "*.tmp", "*.partial", "*.crdownload", "*~", ".*")
CHUNK_FILES = 256


def is_temporary(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TEMPORARY_PATTERNS)


def iter_files(roots: Iterable[str], follow_symlinks: bool = False) -> Iterator[FileSeen]:
    """Regular files under ``roots``, depth first, without following symlinks by default."""
    stack = [os.path.abspath(root) for root in roots]
    while stack:
        current = stack.pop()
        try:
            info = os.stat(current, follow_symlinks=follow_symlinks)
        except OSError:
            log.warning("cannot stat a path under the scanned folders; skipped")
            continue
        if stat.S_ISREG(info.st_mode):
            yield FileSeen(current, info.st_size, info.st_mtime_ns)
            continue
        if not stat.S_ISDIR(info.st_mode):
            if not stat.S_ISLNK(info.st_mode):
                log.info("not a regular file (FIFO, socket or device); ignored")
            continue
        try:
            with os.scandir(current) as entries:
                children = sorted(entry.path for entry in entries if not is_temporary(entry.name))
        except OSError:
            log.warning("cannot list a folder (permission?); skipped")
            continue
        stack.extend(reversed(children))


def count_files(roots: Iterable[str], follow_symlinks: bool = False) -> int:
    return sum(1 for _ in iter_files(roots, follow_symlinks))


def chunked(items: Iterable, size: int) -> Iterator[list]:
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@dataclass
class ScanSummary:
    files: int = 0
    skipped: int = 0
    duplicates: int = 0
    #: Images first registered by this run (a distributed scan sends these at once).
    new_images: set[int] = field(default_factory=set)
    outcomes: Counter = field(default_factory=Counter)

    @property
    def processed(self) -> int:
        return sum(self.outcomes.values())


def unreadable_key(seen: FileSeen) -> str:
    """Row key for a file whose content cannot be read: it still gets a row and a reason."""
    return hashlib.sha256(os.fsencode(seen.path) + f"\0{seen.mtime_ns}".encode()).hexdigest()


def _unreadable_reason(size: int) -> str:
    if size > MAX_FILE_BYTES:
        return f"file of {size} bytes is larger than the {MAX_FILE_BYTES} byte limit; not read"
    return "cannot read the file (no permission, or removed while scanning)"


def register_chunk(
    database_url: str,
    files: list[FileSeen],
    hasher: Callable[[list[str]], list[str | None]],
    summary: ScanSummary,
    owner: str | None = None,
) -> list[int]:
    """Register ``files``; return the ids of images that still need work."""
    metrics.files_seen(len(files))
    with session_scope(database_url) as session:
        unchanged = queue.find_unchanged(session, files)
    for image_id in unchanged.values():
        log.debug("image %d: unchanged since it was registered (path, size, mtime); not read", image_id)
    to_hash = [f for f in files if f.path not in unchanged]
    # Oversized files are refused on their size alone: hashing terabytes of (sparse) zeros would stall.
    readable = iter(hasher([f.path for f in to_hash if f.size_bytes <= MAX_FILE_BYTES]))
    hashes = [None if f.size_bytes > MAX_FILE_BYTES else next(readable) for f in to_hash]
    candidates = set(unchanged.values())
    unreadable: list[tuple[int, int]] = []
    with session_scope(database_url) as session:
        for seen, digest in zip(to_hash, hashes, strict=True):
            image_id, is_new = queue.register(session, seen, digest or unreadable_key(seen))
            if is_new:
                summary.new_images.add(image_id)
            if digest is None:
                unreadable.append((image_id, seen.size_bytes))
                log.debug("image %d: file cannot be read", image_id)
            elif not is_new:  # this content is already known under another path
                summary.duplicates += 1
                log.debug("image %d (%s): content already known; not scored again", image_id, digest[:12])
            else:
                log.debug("image %d (%s): new content, queued", image_id, digest[:12])
            candidates.add(image_id)
        for image_id, size in unreadable:
            if queue.record_problem(session, image_id, ImageStatus.FAILED, _unreadable_reason(size)):
                summary.outcomes["failed"] += 1
                metrics.outcome("failed", reason=_unreadable_reason(size))
        pending = queue.pending_ids(session, candidates, owner)
    still_pending = set(pending)
    summary.skipped += len(files) - len(to_hash) - sum(1 for i in unchanged.values() if i in still_pending)
    return pending
