"""Synthetic DICOM radiographs built from real pixels, for tests (mercure's approach)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

PATIENT_NAME = "Testperson^Alice^Marie"
PATIENT_ID = "PID-93817-XQ"
ACCESSION = "ACC-5551234"
BIRTH_DATE = "20210314"


def radiograph(
    stored: np.ndarray,
    path: Path,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    modality: str = "CR",
    view: str | None = "AP",
    body_part: str | None = "CHEST",
    age: str | None = "003Y",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    syntax=ExplicitVRLittleEndian,
    preamble: bool = True,
    frames: int | None = None,
) -> Path:
    """Write ``stored`` (2-D unsigned integers) as a DICOM radiograph with the given header."""
    meta = FileMetaDataset()
    sop_class = (
        ComputedRadiographyImageStorage if modality == "CR" else DigitalXRayImageStorageForPresentation
    )
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = ACCESSION
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.Modality = modality
    if view:
        ds.ViewPosition = view
    if body_part:
        ds.BodyPartExamined = body_part
    if age:
        ds.PatientAge = age
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16 if bits_stored > 8 else 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept or 0
        ds.RescaleType = "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if frames is not None:
        ds.NumberOfFrames = frames
    dtype = np.uint16 if ds.BitsAllocated == 16 else np.uint8
    ds.PixelData = np.ascontiguousarray(stored.astype(dtype)).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif syntax == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path, enforce_file_format=preamble)
    return path
