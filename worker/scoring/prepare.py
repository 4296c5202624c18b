"""Decode and normalise one file in a child process; never raises.

Runs in the decode pool, so it must stay importable without TensorFlow and
return only picklable values. Each file is read once: the bytes that are hashed
(to check them against the registration) are the bytes that are decoded.

:func:`prepare` decodes a registered file (checking its hash); :func:`prepare_found` reads a
file the scanner has just found, under the scanner's rules (:mod:`worker.ingest.hashing`), and gives
both the hash that registers it and the decode that scores it, from that one read.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.decode import decode_bytes, read_file
from pipeline.errors import ImageProblem, IncompleteFile
from pipeline.hashing import sha256_bytes
from pipeline.lungs import InputPlan
from pipeline.scope import ScopePolicy
from pipeline.types import DecodedImage
from worker.ingest.hashing import read_regular_file

__all__ = ["Prepared", "limit_threads", "prepare", "prepare_found"]


@dataclass
class Prepared:
    """Either ``tensor`` is set (ready for the model) or ``status``/``reason`` say why not."""

    tensor: np.ndarray | None = None
    status: str | None = None
    reason: str | None = None
    incomplete: bool = False
    attributes: dict = field(default_factory=dict)
    #: SHA-256 of the bytes that were decoded (None when the file could not be read).
    sha256: str | None = None
    #: Wall time of reading, decoding and normalising (for the decode-seconds histogram).
    decode_seconds: float | None = None


def _attributes(decoded: DecodedImage, scope: ScopePolicy) -> dict:
    values: dict = {"source_format": str(decoded.source_format)}
    attrs = decoded.dicom
    if attrs is None:
        return values
    values.update(
        study_uid=attrs.study_uid,
        series_uid=attrs.series_uid,
        sop_uid=attrs.sop_uid,
        accession_number=attrs.accession_number,
        patient_id=attrs.patient_id,
        patient_name=attrs.patient_name,
        patient_age_years=attrs.patient_age_years,
        modality=attrs.modality,
        view_position=attrs.view_position,
        study_date=attrs.study_date,
    )
    reasons = scope.out_of_scope_reasons(attrs)
    values.update(out_of_scope=bool(reasons), scope_note="; ".join(reasons) or None)
    return values


def prepare(
    path: str,
    input_size: InputPlan | int,
    expected_sha256: str | None = None,
    *,
    scope: ScopePolicy | None = None,
    full_resolution_decode: bool = False,
) -> Prepared:
    """Decode ``path`` and build the model input; problems become a status and a reason.

    The file is read once and its bytes hashed before they are decoded. With
    ``expected_sha256``, content that no longer matches its registration (still being
    written, or replaced) is reported as incomplete instead of being scored under the
    wrong hash. ``full_resolution_decode`` turns off reduced-resolution decoding (for checks).
    """
    started = time.perf_counter()
    prepared = _decode(path, input_size, expected_sha256, scope or ScopePolicy(), full_resolution_decode)
    prepared.decode_seconds = time.perf_counter() - started
    return prepared


def prepare_found(
    path: str,
    input_size: InputPlan | int,
    *,
    scope: ScopePolicy | None = None,
    full_resolution_decode: bool = False,
    follow_symlinks: bool = False,
) -> Prepared:
    """Read a file just found by the scanner once: ``sha256`` registers it, the rest scores it.

    ``sha256`` is None when the file is not a regular file or cannot be read now (the
    scanner's rule: not registered, looked at again later). A file that grew beyond the
    read limit is hashed but not decoded (it is failed with that reason).
    """
    started = time.perf_counter()
    found = read_regular_file(path, follow_symlinks)
    if found is None:
        return Prepared(status="failed", reason="cannot be read now")
    data, sha256 = found
    if data is None:
        prepared = Prepared(status="failed", reason="file grew beyond the read limit", sha256=sha256)
    else:
        prepared = _decode_data(data, sha256, input_size, scope or ScopePolicy(), full_resolution_decode)
    prepared.decode_seconds = time.perf_counter() - started
    return prepared


def _decode(
    path: str,
    input_size: InputPlan | int,
    expected_sha256: str | None,
    scope: ScopePolicy,
    full_resolution_decode: bool,
) -> Prepared:
    try:
        data = read_file(path)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - see _problem
        return _problem(exc, None)
    sha256 = sha256_bytes(data)
    if expected_sha256 is not None and sha256 != expected_sha256:
        return Prepared(
            status="failed",
            reason="file content changed after it was registered",
            incomplete=True,
            sha256=sha256,
        )
    return _decode_data(data, sha256, input_size, scope, full_resolution_decode)


def _decode_data(
    data: bytes, sha256: str, input_size: InputPlan | int, scope: ScopePolicy, full_resolution_decode: bool
) -> Prepared:
    """Decode bytes already read and hashed; problems become a status and a reason (never raises).

    ``input_size`` is the model's :class:`~pipeline.lungs.InputPlan` (a bare size: the whole film);
    a film in which the lung model finds no two lung fields is rejected here, with that reason."""
    plan = InputPlan.of(input_size)
    try:
        decoded = decode_bytes(data, min_side=None if full_resolution_decode else plan.decode_side)
        del data
        tensor, fields = plan.maker()(decoded.pixels)
        attributes = _attributes(decoded, scope)
        problem = fields.problem() if fields is not None else None
        if problem:
            return Prepared(status="rejected", reason=problem, attributes=attributes, sha256=sha256)
        return Prepared(tensor=tensor, attributes=attributes, sha256=sha256)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - see _problem
        return _problem(exc, sha256)


def _problem(exc: BaseException, sha256: str | None) -> Prepared:
    """The outcome of a file whose read or decode raised: one bad file must never take the worker
    down, and nothing unpicklable (a decoder's PanicException) may cross the decode-pool boundary."""
    if isinstance(exc, IncompleteFile):
        return Prepared(status=exc.status, reason=exc.reason, incomplete=True, sha256=sha256)
    if isinstance(exc, ImageProblem):
        return Prepared(status=exc.status, reason=exc.reason, sha256=sha256)
    if isinstance(exc, MemoryError):
        return Prepared(status="failed", reason="out of memory while decoding", sha256=sha256)
    return Prepared(status="failed", reason=f"the decoder crashed on this file ({type(exc).__name__})")


def limit_threads() -> None:
    """Decode children get one thread each: the pool itself is the parallelism."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
