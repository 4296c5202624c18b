"""What processing did with an image, and a short fixed set of reason classes.

Reasons are free text a person reads ("modality CT is not a projection radiograph");
:class:`ReasonClass` groups them into a handful of stable classes that code and
metrics labels can rely on (a label set must stay small and fixed). :func:`classify`
maps a stored reason to its class.
"""

from __future__ import annotations

import enum
import errno

from db.schema import ImageStatus


class Outcome(enum.StrEnum):
    """The result of one processing attempt on one image."""

    SCORED = ImageStatus.SCORED.value
    REJECTED = ImageStatus.REJECTED.value
    FAILED = ImageStatus.FAILED.value
    #: No longer at any path: nobody can open it (see ImageStatus.SUPERSEDED).
    SUPERSEDED = ImageStatus.SUPERSEDED.value
    #: Not final: back to the queue and tried again shortly (the file is still being written).
    RETRY = "retry"
    #: Not final: cannot be read just now (no permission, share gone); stays queued for the next pass.
    UNREACHABLE = "unreachable"

    @classmethod
    def of_status(cls, status: str | None) -> Outcome:
        return cls(status) if status in {o.value for o in cls} else cls.FAILED


class ReasonClass(enum.StrEnum):
    """Why an image has no score, in a few words. Fixed: used as a metrics label."""

    NONE = "none"
    NOT_CHEST_RADIOGRAPH = "not_chest_radiograph"
    UNSUPPORTED = "unsupported"
    CORRUPT = "corrupt"
    TOO_LARGE = "too_large"
    TIMEOUT = "timeout"
    UNREADABLE = "unreadable"
    GONE = "gone"
    WORKER_DIED = "worker_died"
    OTHER = "other"


#: (class, words any of which in a reason puts it in that class); the first match wins.
_RULES: tuple[tuple[ReasonClass, tuple[str, ...]], ...] = (
    (ReasonClass.WORKER_DIED, ("interrupted", "worker died")),
    (ReasonClass.GONE, ("no longer exists", "disappeared", "replaced")),
    (ReasonClass.UNREADABLE, ("permission", "cannot read", "not a regular file", "unreachable")),
    (ReasonClass.TOO_LARGE, ("larger than", "bomb", "too large")),
    (ReasonClass.TIMEOUT, ("took longer",)),
    (ReasonClass.UNSUPPORTED, ("not a dicom, png or jpeg", "transfer syntax", "cannot be decoded here")),
    (
        ReasonClass.NOT_CHEST_RADIOGRAPH,
        (
            "no pixel data", "modality", "body part", "lateral", "colour", "multi-frame", "too small",
            "veterinary", "blank image", "not a single greyscale", "not a projection",
            "out of distribution",
        ),
    ),
    (
        ReasonClass.CORRUPT,
        (
            "corrupt", "truncated", "does not match", "empty", "ends early", "cannot decode", "crashed",
            "not finite", "invalid", "no dicom data elements", "out of memory", "changed after",
        ),
    ),
)


def classify(reason: str | None) -> ReasonClass:
    """The class of a stored reason (None: the image has no problem)."""
    if not reason:
        return ReasonClass.NONE
    lowered = reason.lower()
    for reason_class, words in _RULES:
        if any(word in lowered for word in words):
            return reason_class
    return ReasonClass.OTHER


#: errno values that say "try again later", not "this file is bad": permissions that an operator
#: fixes, a network share that went away or hangs.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.EACCES, errno.EPERM, errno.EIO, errno.ESTALE, errno.ETIMEDOUT, errno.EHOSTDOWN,
        errno.EHOSTUNREACH, errno.ENOTCONN, errno.ENODEV, errno.ENXIO, errno.EAGAIN, errno.EBUSY,
        errno.ENETDOWN, errno.ENETUNREACH, errno.ECONNABORTED, errno.ECONNRESET,
    }
)

#: Reasons from the decoder that describe a passing I/O condition, not the file.
TRANSIENT_REASONS = ("no permission to read the file", "file disappeared before it could be read")


def is_transient(reason: str | None) -> bool:
    return bool(reason) and any(reason.startswith(text) for text in TRANSIENT_REASONS)
