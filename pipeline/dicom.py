"""DICOM decoding: header checks, pixel decoding and the grey-scale pipeline.

The grey-scale pipeline follows PS3.4 Annex N (the standard display pipeline)
for radiographs:

1. Modality LUT (PS3.3 C.11.1): Rescale Slope/Intercept or the Modality LUT
   Sequence - :func:`pydicom.pixels.apply_modality_lut`.
2. VOI LUT (PS3.3 C.11.2): Window Center/Width or the VOI LUT Sequence -
   :func:`pydicom.pixels.apply_voi_lut`; without either the full range is used.
3. Presentation: MONOCHROME1 (PS3.3 C.7.6.3.1.2) and Presentation LUT Shape
   INVERSE (PS3.3 C.11.6.1) mean the minimum value is displayed white, so grey
   levels are inverted to the MONOCHROME2 convention the model is trained on.

Everything that can be checked from the header is checked before the pixel
data are decoded, so that a file declaring enormous dimensions is refused
before a buffer for them is allocated.
"""

from __future__ import annotations

import re
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as dicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from pipeline.decode import DicomAttributes
from pipeline.errors import FailedImage, IncompleteFile, RejectedImage
from pipeline.limits import MAX_DECODED_BYTES, MAX_PIXELS, MIN_SIDE

#: Modalities of projection radiographs (PS3.3 C.7.3.1.1.1 defined terms).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
#: Body Part Examined values (PS3.16 Annex L) that denote the chest.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LUNG"})
#: View Position values (PS3.3 C.8.11.5.1.1 / C.8.19.6.x) that are lateral projections.
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Validated population of the shipped model: children aged 1 to 5 years.
VALIDATED_AGE_YEARS = (1.0, 5.0)

# pydicom's validation warnings quote element values (UIDs, names): never let them reach logs.
dicom_config.settings.reading_validation_mode = dicom_config.IGNORE
dicom_config.convert_wrong_length_to_UN = True

_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY])\s*$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_age_years(value: object) -> float | None:
    """Age String (PS3.5 6.2, VR AS: ``nnnD|W|M|Y``) in years, or None."""
    match = _AGE.match(str(value or ""))
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)] if match else None


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def read_attributes(ds: Dataset) -> DicomAttributes:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return DicomAttributes(
        study_uid=_text(ds, "StudyInstanceUID"),
        series_uid=_text(ds, "SeriesInstanceUID"),
        sop_uid=_text(ds, "SOPInstanceUID"),
        accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_age_years=parse_age_years(ds.get("PatientAge")),
        modality=(_text(ds, "Modality") or "").upper() or None,
        view_position=(_text(ds, "ViewPosition") or "").upper() or None,
        body_part=(_text(ds, "BodyPartExamined") or "").upper() or None,
        photometric=(_text(ds, "PhotometricInterpretation") or "").upper() or None,
        transfer_syntax=str(ts) if ts else None,
    )


def out_of_scope_reasons(attrs: DicomAttributes) -> list[str]:
    """Why a score for this film falls outside the model's validated population."""
    reasons = []
    low, high = VALIDATED_AGE_YEARS
    age = attrs.patient_age_years
    if age is None:
        reasons.append("patient age not recorded")
    elif not low <= age < high + 1:  # "5 years" includes 5 years 11 months
        reasons.append(f"patient age {age:.1f} years is outside the validated {low:.0f}-{high:.0f} years")
    if attrs.view_position is None:
        reasons.append("view position not recorded")
    return reasons


def _read_dataset(path: Path) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True, defer_size="2 MB")
            ds.get("PixelData")  # force lazy reading of the header up to the pixels
    except (InvalidDicomError, EOFError) as exc:
        raise IncompleteFile(f"DICOM data set ends early: {exc}") from exc
    except (zlib.error, OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise FailedImage(f"corrupt DICOM header: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise FailedImage("no DICOM data elements could be read")
    _ensure_transfer_syntax(ds)
    return ds


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Files without file meta (PS3.10 7.1 violated) get the encoding they were read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = True, True
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise FailedImage(f"invalid {keyword} in header: {value!r}") from exc


def check_scope(ds: Dataset, attrs: DicomAttributes) -> None:
    """Reject objects that are not single frontal greyscale chest radiographs."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = ds.get("SOPClassUID")
        kind = getattr(sop, "name", None) or "unknown SOP class"
        raise RejectedImage(f"DICOM object has no pixel data ({kind})")
    species = _text(ds, "PatientSpeciesDescription")
    if species and "homo" not in species.lower() and "human" not in species.lower():
        raise RejectedImage("veterinary image (Patient Species Description is not human)")
    is_chest_capture = (
        str(ds.get("SOPClassUID", "")) == SecondaryCaptureImageStorage and attrs.body_part in CHEST_BODY_PARTS
    )
    if attrs.modality not in RADIOGRAPH_MODALITIES and not is_chest_capture:
        shown = attrs.modality or "not recorded"
        raise RejectedImage(f"modality {shown} is not a projection radiograph (CR or DX)")
    if attrs.body_part and attrs.body_part not in CHEST_BODY_PARTS:
        raise RejectedImage(f"body part {attrs.body_part} is not the chest")
    if attrs.view_position in LATERAL_VIEWS:
        raise RejectedImage(f"lateral view ({attrs.view_position}); only frontal films are scored")
    if attrs.photometric not in GREYSCALE or _int(ds, "SamplesPerPixel", 1) != 1:
        raise RejectedImage(f"colour image ({attrs.photometric or 'no photometric interpretation'})")
    frames = _int(ds, "NumberOfFrames", 1)
    if frames > 1:
        raise RejectedImage(f"multi-frame object with {frames} frames: unclear which frame to read")


def check_dimensions(ds: Dataset) -> None:
    """Refuse bombs and unreadably small images before decoding anything."""
    rows, cols = _int(ds, "Rows", 0), _int(ds, "Columns", 0)
    if rows <= 0 or cols <= 0:
        raise FailedImage(f"header declares an empty image ({rows}x{cols})")
    frames = max(_int(ds, "NumberOfFrames", 1), 1)
    bits = _int(ds, "BitsAllocated", 16)
    samples = _int(ds, "SamplesPerPixel", 1)
    if rows * cols > MAX_PIXELS or rows * cols * frames * samples * max(bits, 8) // 8 > MAX_DECODED_BYTES:
        raise FailedImage(
            f"header declares {frames} frame(s) of {rows}x{cols}, above the decode limit "
            "(possible decompression bomb)"
        )
    if min(rows, cols) < MIN_SIDE:
        raise RejectedImage(f"image too small to read: {cols}x{rows} (minimum side {MIN_SIDE})")


def _decode_pixels(ds: Dataset) -> np.ndarray:
    ts = ds.file_meta.TransferSyntaxUID
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except NotImplementedError as exc:
        raise FailedImage(f"transfer syntax {getattr(ts, 'name', ts)} cannot be decoded here") from exc
    except (ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        message = str(exc).splitlines()[0][:200]
        if "less than expected" in message or "truncated" in message.lower():
            # Short pixel data is also what a file still being copied looks like: retryable.
            raise IncompleteFile(f"pixel data does not match the header: {message}") from exc
        raise FailedImage(f"cannot decode pixel data ({getattr(ts, 'name', ts)}): {message}") from exc
    if pixels.ndim != 2:
        raise RejectedImage(f"pixel array of shape {pixels.shape} is not a single greyscale frame")
    return pixels


def to_display_grey(pixels: np.ndarray, ds: Dataset) -> np.ndarray:
    """Modality LUT, VOI LUT, then presentation inversion; grey levels in [0, 1]."""
    values = apply_modality_lut(pixels, ds)
    if "WindowCenter" in ds or "VOILUTSequence" in ds:
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
    values = np.asarray(values, dtype=np.float32)
    if not np.all(np.isfinite(values)):
        raise FailedImage("pixel values are not finite after the modality and VOI LUTs")
    low, high = float(values.min()), float(values.max())
    if high <= low:
        raise RejectedImage("blank image: every pixel has the same value")
    grey = (values - low) / (high - low)
    shape = str(ds.get("PresentationLUTShape", "")).upper()
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1" or shape == "INVERSE":
        grey = 1.0 - grey
    return grey


def decode_dicom(path: str | Path) -> tuple[np.ndarray, DicomAttributes]:
    """Decode one DICOM file into display grey levels and the attributes kept with a score."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _read_dataset(Path(path))
            attrs = read_attributes(ds)
            check_scope(ds, attrs)
            check_dimensions(ds)
            return to_display_grey(_decode_pixels(ds), ds), attrs
    except (FailedImage, RejectedImage, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - lazy parsing surfaces damage anywhere; Rust decoders
        # (pylibjpeg-rle via pyo3) raise PanicException, a BaseException, on crafted pixel data.
        raise FailedImage(f"corrupt DICOM data set ({type(exc).__name__})") from exc


def read_header(path: str | Path) -> DicomAttributes:
    """Attributes alone, without touching pixel data (for listings and diagnostics)."""
    return read_attributes(_read_dataset(Path(path)))
