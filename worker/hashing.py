"""Content hash of a file found by the scanner or the watcher, refusing anything but a regular file.

The type is decided on the open file descriptor (``fstat``), not on an earlier
``stat`` of the name: a file swapped for a symlink (to outside the drop folder) or
for a FIFO between listing and hashing is refused, not followed or waited on. The
file is opened with ``O_NONBLOCK`` so that opening a FIFO never blocks, and with
``O_NOFOLLOW`` unless symlinks are followed on purpose (``--follow-symlinks``).

Kept free of heavy imports: it runs in the decode pool's spawned children.
"""

from __future__ import annotations

import os
import stat

from pipeline.hashing import sha256_descriptor


def sha256_regular_file(path: str, follow_symlinks: bool = False) -> str | None:
    """SHA-256 of ``path`` if it is a regular file that can be read now, else None.

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
        return sha256_descriptor(descriptor)
    except OSError:
        return None
    finally:
        os.close(descriptor)


def sha256_following_links(path: str) -> str | None:
    """:func:`sha256_regular_file` for ``--follow-symlinks`` (a picklable top-level function)."""
    return sha256_regular_file(path, follow_symlinks=True)
