"""A short, fixed set of reason classes for failure and rejection counters.

A metric label must never carry free text (a reason can quote a header value), so
every reason string is mapped onto one of these classes. Helper "core" is adding
typed outcomes (``worker.outcomes.ReasonClass``); until that lands this enum is the
set, and the integrator can make one an alias of the other.
"""

from __future__ import annotations

import enum


class ReasonClass(enum.StrEnum):
    NOT_AN_IMAGE = "not_an_image"  # not DICOM/PNG/JPEG, no pixel data (SR, ECG, RT plan)
    OUT_OF_PROTOCOL = "out_of_protocol"  # CT, lateral, colour, multi-frame, not chest, too small, blank
    CORRUPT = "corrupt"  # truncated, header/pixels mismatch, corrupt header, not finite
    UNSUPPORTED = "unsupported"  # transfer syntax cannot be decoded here
    TOO_LARGE = "too_large"  # size limit, decompression bomb
    UNREADABLE = "unreadable"  # empty, gone, no permission, changed after registration
    WORKER_LOST = "worker_lost"  # interrupted its worker too many times, decoder crashed, out of memory
    OTHER = "other"


#: First match wins; lower-case substrings of the reason texts in pipeline/ and worker/.
_RULES: tuple[tuple[tuple[str, ...], ReasonClass], ...] = (
    (("interrupted", "decoder crashed", "out of memory", "worker died"), ReasonClass.WORKER_LOST),
    (("larger than", "decompression bomb"), ReasonClass.TOO_LARGE),
    (("transfer syntax",), ReasonClass.UNSUPPORTED),
    (
        ("empty file", "disappeared", "no permission", "cannot read", "no longer exists", "not a regular",
         "content changed", "file gone"),
        ReasonClass.UNREADABLE,
    ),
    (("not a dicom, png or jpeg", "no pixel data"), ReasonClass.NOT_AN_IMAGE),
    (
        ("modality", "body part", "lateral", "colour", "multi-frame", "too small", "blank image",
         "veterinary", "greyscale frame"),
        ReasonClass.OUT_OF_PROTOCOL,
    ),
    (
        ("truncated", "does not match", "corrupt", "ends early", "cannot decode", "invalid", "empty image",
         "not finite", "no dicom data"),
        ReasonClass.CORRUPT,
    ),
)


def classify(reason: str | None) -> ReasonClass:
    """The class of a reason text (never the text itself: it may quote header values)."""
    text = (reason or "").lower()
    for needles, reason_class in _RULES:
        if any(needle in text for needle in needles):
            return reason_class
    return ReasonClass.OTHER
