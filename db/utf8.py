"""Whether text or bytes are valid UTF-8: the one test that stored paths (:mod:`db.paths`), stored
DICOM text (:mod:`db.attributes`) and migration 0004a share. It is the codec's definition, so a
migration may use it without the risk of a later change rewriting its history."""

from __future__ import annotations


def is_utf8(value: str | bytes) -> bool:
    """True for bytes that decode as UTF-8, and for text that encodes as UTF-8 (no lone surrogates:
    Python's stand-ins for undecodable bytes in a file name or a DICOM header)."""
    try:
        value.decode("utf-8") if isinstance(value, bytes) else value.encode("utf-8")
    except UnicodeError:
        return False
    return True
