"""The one SHA-256 helper: content hashes name files everywhere (database key, logs, caches)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

HASH_CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex SHA-256 of bytes already in memory (the bytes a decoder is about to read)."""
    return hashlib.sha256(data).hexdigest()


def sha256_descriptor(descriptor: int) -> str:
    """Hex SHA-256 of what remains to be read from an open file descriptor; ``OSError`` propagates.

    For callers that decide on the open descriptor what they are reading (``worker.ingest.hashing``).
    """
    digest = hashlib.sha256()
    while chunk := os.read(descriptor, HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's content, read in 1 MiB chunks; ``OSError`` propagates."""
    with open(path, "rb") as handle:
        return sha256_descriptor(handle.fileno())


def sha256_file_or_none(path: str | Path) -> str | None:
    """Like :func:`sha256_file`, but None when the file cannot be read (gone, no permission)."""
    try:
        return sha256_file(path)
    except OSError:
        return None
