"""Decode and normalise one file in a child process; never raises.

Runs in the decode pool, so it must stay importable without TensorFlow and
return only picklable values. Each file is read once: the bytes that are hashed
(to check them against the registration) are the bytes that are decoded.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.decode import decode_bytes, read_file
from pipeline.errors import ImageProblem, IncompleteFile
from pipeline.hashing import sha256_bytes
from pipeline.normalise import to_model_input
from pipeline.scope import ScopePolicy
from pipeline.types import DecodedImage

__all__ = ["Prepared", "limit_threads", "prepare"]


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
    input_size: int,
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


def _decode(
    path: str, input_size: int, expected_sha256: str | None, scope: ScopePolicy, full_resolution_decode: bool
) -> Prepared:
    sha256 = None
    try:
        data = read_file(path)
        sha256 = sha256_bytes(data)
        if expected_sha256 is not None and sha256 != expected_sha256:
            return Prepared(
                status="failed",
                reason="file content changed after it was registered",
                incomplete=True,
                sha256=sha256,
            )
        decoded = decode_bytes(data, min_side=None if full_resolution_decode else input_size)
        del data
        return Prepared(
            tensor=to_model_input(decoded.pixels, input_size),
            attributes=_attributes(decoded, scope),
            sha256=sha256,
        )
    except IncompleteFile as exc:
        return Prepared(status=exc.status, reason=exc.reason, incomplete=True, sha256=sha256)
    except ImageProblem as exc:
        return Prepared(status=exc.status, reason=exc.reason, sha256=sha256)
    except MemoryError:
        return Prepared(status="failed", reason="out of memory while decoding", sha256=sha256)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - one bad file must never take the worker down, and
        # nothing unpicklable (a decoder's PanicException) may cross the decode-pool boundary.
        return Prepared(status="failed", reason=f"the decoder crashed on this file ({type(exc).__name__})")


def limit_threads() -> None:
    """Decode children get one thread each: the pool itself is the parallelism."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
