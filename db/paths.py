"""File paths as stored in the database.

POSIX file names are bytes; Python hands undecodable bytes over as lone
surrogates, which no database text column accepts. Such names are stored with
the undecodable bytes written as ``\\xNN`` (readable, and reversible):
:func:`from_db` gives back the name that opens the file.
"""

from __future__ import annotations

import codecs
import os


def to_db(path: str) -> str:
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:
        # Literal backslashes are doubled first, so that decoding the escapes is unambiguous.
        return os.fsencode(path).replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")


def from_db(stored: str) -> list[str]:
    """Candidate file-system names for a stored path: the literal one first."""
    candidates = [stored]
    if "\\x" in stored:
        raw = codecs.escape_decode(stored.encode("utf-8"))[0]
        candidates.append(os.fsdecode(raw))
    return candidates
