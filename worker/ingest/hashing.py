"""Content of a file found by the scanner or the watcher, refusing anything but a regular file.

The type is decided on the open file descriptor (``fstat``), not on an earlier
``stat`` of the name: a file swapped for a symlink (to outside the drop folder) or
for a FIFO between listing and hashing is refused, not followed or waited on. The
file is opened with ``O_NONBLOCK`` so that opening a FIFO never blocks, and with
``O_NOFOLLOW`` unless symlinks are followed on purpose (``--follow-symlinks``).

Two ways to read it, with the same rules: :func:`sha256_regular_file` hashes it (the
registration key, when the file is decoded elsewhere), :func:`read_regular_file` keeps its
bytes too, so that the embedded path hashes and decodes one read (``worker.scoring.prepare``).

Kept free of heavy imports: it runs in the decode pool's spawned children.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from typing import TypeVar

from pipeline.hashing import sha256_bytes, sha256_descriptor
from pipeline.limits import MAX_FILE_BYTES

T = TypeVar("T")


def _with_regular_file(path: str, follow_symlinks: bool, read: Callable[[int], T]) -> T | None:
    """``read(descriptor)`` of ``path`` if it is a regular file that can be read now, else None.

    None covers "cannot be read now" (no permission, share unreachable, gone) and
    "not a regular file"; the caller treats both as "not registered, look again
    later", never as a final state for content it has not seen.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        return read(descriptor)
    except OSError:
        return None
    finally:
        os.close(descriptor)


def sha256_regular_file(path: str, follow_symlinks: bool = False) -> str | None:
    """SHA-256 of ``path`` if it is a regular file that can be read now, else None."""
    return _with_regular_file(path, follow_symlinks, sha256_descriptor)


def sha256_following_links(path: str) -> str | None:
    """:func:`sha256_regular_file` for ``--follow-symlinks`` (a picklable top-level function)."""
    return sha256_regular_file(path, follow_symlinks=True)


def _read_and_hash(descriptor: int) -> tuple[bytes | None, str]:
    """All bytes (one read sized by ``fstat``) and their SHA-256; the bytes are dropped for a file
    beyond the decode limit (it grew after it was listed: the lister refuses larger ones)."""
    with open(descriptor, "rb", buffering=0, closefd=False) as handle:
        data = handle.readall()
    return (data if len(data) <= MAX_FILE_BYTES else None), sha256_bytes(data)


def read_regular_file(path: str, follow_symlinks: bool = False) -> tuple[bytes | None, str] | None:
    """(content, SHA-256) of ``path`` if it is a regular file that can be read now, else None.

    The content is None (the hash is still given) for a file larger than
    :data:`pipeline.limits.MAX_FILE_BYTES`, which is never decoded."""
    return _with_regular_file(path, follow_symlinks, _read_and_hash)
