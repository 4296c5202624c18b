"""Typed outcomes and reason classes (issue 15 item 3): a short fixed set every reason maps into."""

from __future__ import annotations

import pytest

from db.schema import FINAL_STATUSES
from worker.outcomes import Outcome, ReasonClass, classify, is_transient


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (None, ReasonClass.NONE),
        ("DICOM object has no pixel data (Comprehensive SR Storage)", ReasonClass.NOT_CHEST_RADIOGRAPH),
        ("modality CT is not a projection radiograph (CR or DX)", ReasonClass.NOT_CHEST_RADIOGRAPH),
        ("lateral view (LL); only frontal films are scored", ReasonClass.NOT_CHEST_RADIOGRAPH),
        ("colour image: not a greyscale radiograph", ReasonClass.NOT_CHEST_RADIOGRAPH),
        ("not a DICOM, PNG or JPEG file", ReasonClass.UNSUPPORTED),
        ("transfer syntax Deflated cannot be decoded here", ReasonClass.UNSUPPORTED),
        ("empty file", ReasonClass.CORRUPT),
        ("truncated image data: x", ReasonClass.CORRUPT),
        ("pixel data does not match the header: x", ReasonClass.CORRUPT),
        ("decompression bomb refused: x", ReasonClass.TOO_LARGE),
        ("file of 9 bytes is larger than the 8 byte limit; not read", ReasonClass.TOO_LARGE),
        ("decoding took longer than 120 s", ReasonClass.TIMEOUT),
        ("cannot read the file (no permission, or removed while scanning)", ReasonClass.UNREADABLE),
        ("file no longer exists at any known path", ReasonClass.GONE),
        (
            "processing was interrupted 3 times (the worker died each time); not retried",
            ReasonClass.WORKER_DIED,
        ),
        (
            "does not look like a frontal chest radiograph (out of distribution)",
            ReasonClass.NOT_CHEST_RADIOGRAPH,
        ),
        ("something nobody foresaw", ReasonClass.OTHER),
    ],
)
def test_reasons_fall_into_a_short_fixed_set_of_classes(reason, expected):
    assert classify(reason) is expected


def test_outcomes_name_the_final_states_and_the_two_ways_back():
    assert {o.value for o in Outcome} == {s.value for s in FINAL_STATUSES} | {"retry", "unreachable"}
    assert Outcome.of_status("rejected") is Outcome.REJECTED and Outcome.of_status(None) is Outcome.FAILED
    assert len(ReasonClass) <= 12  # a metrics label: small and fixed


def test_passing_io_conditions_are_not_final():
    assert is_transient("no permission to read the file")
    assert not is_transient("empty file") and not is_transient(None)
