"""Decode and normalise one file in a child process; never raises.

Runs in the decode pool, so it must stay importable without TensorFlow and
return only picklable values.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field

import numpy as np

from pipeline.decode import decode_file
from pipeline.errors import ImageProblem, IncompleteFile
from pipeline.normalise import to_model_input

HASH_CHUNK_BYTES = 1 << 20


@dataclass
class Prepared:
    """Either ``tensor`` is set (ready for the model) or ``status``/``reason`` say why not."""

    tensor: np.ndarray | None = None
    status: str | None = None
    reason: str | None = None
    incomplete: bool = False
    attributes: dict = field(default_factory=dict)
    #: Wall time of decoding and normalising (for the decode-seconds histogram).
    decode_seconds: float | None = None


def _attributes(decoded) -> dict:
    from pipeline.dicom import out_of_scope_reasons

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
    )
    reasons = out_of_scope_reasons(attrs)
    values.update(out_of_scope=bool(reasons), scope_note="; ".join(reasons) or None)
    return values


def prepare(path: str, input_size: int, expected_sha256: str | None = None) -> Prepared:
    """Decode ``path`` and build the model input; problems become a status and a reason.

    With ``expected_sha256``, a file whose content no longer matches its registration
    (still being written, or replaced) is reported as incomplete instead of being
    scored under the wrong hash.
    """
    if expected_sha256 is not None and sha256_file(path) != expected_sha256:
        return Prepared(
            status="failed", reason="file content changed after it was registered", incomplete=True
        )
    started = time.perf_counter()
    prepared = _decode(path, input_size)
    prepared.decode_seconds = time.perf_counter() - started
    return prepared


def _decode(path: str, input_size: int) -> Prepared:
    try:
        decoded = decode_file(path)
        return Prepared(tensor=to_model_input(decoded.pixels, input_size), attributes=_attributes(decoded))
    except IncompleteFile as exc:
        return Prepared(status=exc.status, reason=exc.reason, incomplete=True)
    except ImageProblem as exc:
        return Prepared(status=exc.status, reason=exc.reason)
    except MemoryError:
        return Prepared(status="failed", reason="out of memory while decoding")
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - one bad file must never take the worker down, and
        # nothing unpicklable (a decoder's PanicException) may cross the decode-pool boundary.
        return Prepared(status="failed", reason=f"the decoder crashed on this file ({type(exc).__name__})")


def sha256_file(path: str) -> str | None:
    """Content hash, or None when the file cannot be read (gone, no permission)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def limit_threads() -> None:
    """Decode children get one thread each: the pool itself is the parallelism."""
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
