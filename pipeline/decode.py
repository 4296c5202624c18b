"""Entry point of the pipeline: a file path in, grey pixels and attributes out."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import FailedImage, RejectedImage
from pipeline.formats import HEADER_BYTES, ImageFormat, detect_format
from pipeline.limits import MAX_FILE_BYTES


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
    body_part: str | None = None
    photometric: str | None = None
    transfer_syntax: str | None = None


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32, 2-D, [0, 1], 0 = black
    source_format: ImageFormat
    dicom: DicomAttributes | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def decode_file(path: str | Path) -> DecodedImage:
    """Decode any supported file; raise :class:`pipeline.errors.ImageProblem` otherwise."""
    path = Path(path)
    try:
        size = os.stat(path).st_size
        if size == 0:
            raise FailedImage("empty file")
        if size > MAX_FILE_BYTES:
            raise FailedImage(f"file of {size} bytes is larger than the {MAX_FILE_BYTES} byte limit")
        with open(path, "rb") as handle:
            head = handle.read(HEADER_BYTES)
    except FileNotFoundError as exc:
        raise FailedImage("file disappeared before it could be read") from exc
    except PermissionError as exc:
        raise FailedImage("no permission to read the file") from exc
    except IsADirectoryError as exc:
        raise FailedImage("not a regular file") from exc

    kind = detect_format(head)
    if kind is ImageFormat.DICOM:
        from pipeline.dicom import decode_dicom  # pydicom import is kept off the raster path

        pixels, attributes = decode_dicom(path)
        return DecodedImage(pixels=pixels, source_format=kind, dicom=attributes)
    if kind in (ImageFormat.PNG, ImageFormat.JPEG):
        from pipeline.raster import decode_raster

        return DecodedImage(pixels=decode_raster(path), source_format=kind)
    raise RejectedImage("not a DICOM, PNG or JPEG file")
