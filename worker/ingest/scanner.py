"""Walk folders, register files by content hash, and hand new work to a sink.

Constant memory: files are streamed in chunks; a file already registered with
the same path, size and mtime is skipped without being read. A killed scan
resumes where it stopped: registered-but-unscored images are picked up again.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from itertools import islice

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

#: ``hasher(paths)`` or ``hasher(paths, follow_symlinks=True)`` -> hashes in order (None: unreadable now).
Hasher = Callable[..., list[str | None]]


def is_temporary(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in TEMPORARY_PATTERNS)


def iter_files(roots: Iterable[str], follow_symlinks: bool = False) -> Iterator[FileSeen]:
    """Regular files under ``roots``, depth first, without following symlinks by default.

    Each folder is listed once, by (device, inode): with ``follow_symlinks`` a link to
    an enclosing folder (a symlink loop) would otherwise be walked forever.
    """
    stack = [os.path.abspath(root) for root in roots]
    visited: set[tuple[int, int]] = set()
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
        if (info.st_dev, info.st_ino) in visited:
            log.info("a folder reached again through a symlink (loop?); not listed twice")
            continue
        visited.add((info.st_dev, info.st_ino))
        try:
            with os.scandir(current) as entries:
                children = sorted(entry.path for entry in entries if not is_temporary(entry.name))
        except OSError:
            log.warning("cannot list a folder (permission?); skipped")
            continue
        stack.extend(reversed(children))


def count_files(roots: Iterable[str], follow_symlinks: bool = False, limit: int | None = None) -> int:
    """Regular files under ``roots``; with ``limit``, the walk stops once it has found that many."""
    files = iter_files(roots, follow_symlinks)
    return sum(1 for _ in (files if limit is None else islice(files, limit)))


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
    #: Files that could not be read now (permission, share unreachable, stalled, replaced by a
    #: FIFO or link): not registered, so the next scan or rescan looks at them again.
    unreadable: int = 0
    #: Images first registered by this run (a distributed scan sends these at once).
    new_images: set[int] = field(default_factory=set)
    outcomes: Counter = field(default_factory=Counter)

    @property
    def processed(self) -> int:
        return sum(self.outcomes.values())


def unreadable_key(seen: FileSeen) -> str:
    """Row key for a file whose content is never read (too large): it still gets a row and a reason."""
    return queue.path_key(seen.path, seen.mtime_ns)


def _oversized_reason(size: int) -> str:
    return f"file of {size} bytes is larger than the {MAX_FILE_BYTES} byte limit; not read"


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def _hash(hasher: Hasher, files: list[FileSeen], follow_symlinks: bool) -> list[str | None]:
    """Hashes in order; oversized files are refused on their size alone (hashing terabytes of
    sparse zeros would stall the scan) and get None."""
    small = [f.path for f in files if f.size_bytes <= MAX_FILE_BYTES]
    digests = iter(hasher(small, follow_symlinks=True) if follow_symlinks else hasher(small))
    return [None if f.size_bytes > MAX_FILE_BYTES else next(digests) for f in files]


def files_to_read(session, files: list[FileSeen]) -> list[str]:
    """Paths among ``files`` that :func:`register_chunk` will read: new or changed since they were
    registered (path, size, mtime) and within the size that is read at all."""
    unchanged = queue.find_unchanged(session, files)
    return [f.path for f in files if f.path not in unchanged and f.size_bytes <= MAX_FILE_BYTES]


def register_chunk(
    database_url: str,
    files: list[FileSeen],
    hasher: Hasher,
    summary: ScanSummary,
    owner: str | None = None,
    follow_symlinks: bool = False,
) -> list[int]:
    """Register ``files``; return the ids of images that still need work.

    A file that cannot be read now is not registered at all (a permission error or a
    share that is down is transient): it stays unknown, so the next scan hashes it again.
    """
    metrics.files_seen(len(files))
    with session_scope(database_url) as session:
        unchanged = queue.find_unchanged(session, files)
    for image_id in unchanged.values():
        log.debug("image %d: unchanged since it was registered (path, size, mtime); not read", image_id)
    to_hash = [f for f in files if f.path not in unchanged]
    hashes = _hash(hasher, to_hash, follow_symlinks)
    candidates = set(unchanged.values())
    oversized: list[tuple[int, int]] = []
    unreadable = 0
    readable = []
    for seen, digest in zip(to_hash, hashes, strict=True):
        if digest is None and seen.size_bytes <= MAX_FILE_BYTES:
            unreadable += 1
            log.debug("a file cannot be read now (permission, share, not a regular file); retried later")
        else:
            readable.append((seen, digest))
    with session_scope(database_url) as session:
        registered = queue.register_many(
            session, [(seen, digest or unreadable_key(seen)) for seen, digest in readable]
        )
        for (seen, digest), (image_id, is_new) in zip(readable, registered, strict=True):
            if is_new:
                summary.new_images.add(image_id)
            if digest is None:
                oversized.append((image_id, seen.size_bytes))
                log.debug("image %d: file too large to read", image_id)
            elif not is_new:  # this content is already known under another path
                summary.duplicates += 1
                pruned = queue.prune_missing_paths(session, image_id, seen.path, _exists)
                log.debug(
                    "image %d (%s): content already known; not scored again%s",
                    image_id,
                    digest[:12],
                    f" ({pruned} old path(s) gone)" if pruned else "",
                )
            else:
                log.debug("image %d (%s): new content, queued", image_id, digest[:12])
            candidates.add(image_id)
        for image_id, size in oversized:
            if queue.record_problem(session, image_id, ImageStatus.FAILED, _oversized_reason(size)):
                summary.outcomes["failed"] += 1
                metrics.outcome("failed", reason=_oversized_reason(size))
        pending = queue.pending_ids(session, candidates, owner)
    summary.unreadable += unreadable
    if unreadable:
        log.warning("%d file(s) could not be read now; the next scan tries them again", unreadable)
    still_pending = set(pending)
    summary.skipped += len(files) - len(to_hash) - sum(1 for i in unchanged.values() if i in still_pending)
    return pending
