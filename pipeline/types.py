"""Values shared by the decoders and their callers, in a module that imports no decoder.

:mod:`pipeline.decode` (the entry point) and :mod:`pipeline.dicom` (one decoder) both need
these types; keeping them here is what lets ``dicom`` avoid importing ``decode`` back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import numpy as np

from pipeline.formats import ImageFormat


@dataclass(frozen=True)
class DicomAttributes:
    """Header values kept with a score. Identifiers here must never be logged."""

    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_age_years: float | None = None
    modality: str | None = None
    view_position: str | None = None
    #: Study Date (0008,0020); None when absent or not a valid date.
    study_date: date | None = None
    body_part: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32, 2-D, [0, 1], 0 = black
    source_format: ImageFormat
    dicom: DicomAttributes | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    #: SHA-256 of the very bytes that were decoded (set by :func:`pipeline.decode.decode_file`).
    sha256: str | None = None
