"""File paths as stored in the database: readable, and one stored text per file name.

POSIX file names are bytes; Python hands undecodable bytes over as lone
surrogates, which no database text column accepts. The stored form is:

* a name that is valid UTF-8 and has no backslash: itself (nearly every name);
* any other name: its bytes, with each backslash written ``\\\\`` and each byte
  that is not part of valid UTF-8 written ``\\xNN``.

So a stored text contains a backslash exactly when it is escaped, and the
encoding is reversible and unambiguous: the literal name ``a\\xff`` is stored
``a\\\\xff``, the raw byte name ``a<0xff>`` is stored ``a\\xff``. (Until
migration 0004a, names with a backslash were stored as they were, so both of
those were stored ``a\\xff``, and a literal ``\\x`` crashed the decoder.)
"""

from __future__ import annotations

import os
import re

from db.utf8 import is_utf8

_ESCAPE = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def needs_escaping(path: str) -> bool:
    return "\\" in path or not is_utf8(path)


def to_db(path: str) -> str:
    """The stored text of a file-system name (as Python gives it, surrogates included)."""
    if not needs_escaping(path):
        return path
    raw = os.fsencode(path).replace(b"\\", b"\\\\")
    return raw.decode("utf-8", "backslashreplace")


def decode_stored(stored: str) -> bytes | None:
    """The file name bytes of an escaped stored text, or None if ``stored`` is not well-formed."""
    out = bytearray()
    position = 0
    for escape in _ESCAPE.finditer(stored):
        literal = stored[position : escape.start()]
        if "\\" in literal:
            return None
        out += literal.encode("utf-8", "surrogateescape")
        token = escape.group(1)
        out += b"\\" if token == "\\" else bytes([int(token[1:], 16)])
        position = escape.end()
    tail = stored[position:]
    if "\\" in tail:
        return None
    out += tail.encode("utf-8", "surrogateescape")
    return bytes(out)


def from_db_one(stored: str) -> str:
    """The file-system name (as Python spells it) that ``stored`` stands for."""
    if "\\" not in stored:
        return stored
    raw = decode_stored(stored)
    return stored if raw is None else os.fsdecode(raw)


def from_db(stored: str) -> list[str]:
    """Candidate file-system names for a stored path (one, since migration 0004a).

    A list for the callers that try each candidate in turn.
    """
    return [from_db_one(stored)]
