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
before a buffer for them is allocated; for encapsulated transfer syntaxes
(PS3.5 A.4) that includes the compressed frame's own header
(:mod:`pipeline.codestream`), which is what the decoder allocates from.

Reduced resolution: the model reads a small square, so with ``min_side`` a
JPEG 2000 frame (PS3.5 A.4.4) is decoded at the highest wavelet reduction
level whose short side is still at least ``min_side`` times a safety factor
(:mod:`pipeline.codestream` says why), and an 8-bit JPEG baseline/extended
frame (PS3.5 A.4.1) with DCT scaling (Pillow ``draft``).
The LUTs and the presentation rules above then apply unchanged to the smaller
array. Any other transfer syntax, and anything unusual (signed or more than
16-bit JPEG 2000, colour, a decoder error), takes the full-resolution path; there,
unsigned stored values whose LUT chain is linear (:func:`has_linear_luts`) are
block-averaged (:func:`pipeline.raster.bin_down`) before the float LUT chain.

Validated-population rules (age, view) are model policy, not decoding: see
:mod:`pipeline.scope`. pydicom's global configuration is set by
:func:`configure_pydicom`, which process entry points call.
"""

from __future__ import annotations

import io
import re
import warnings
import zlib
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config as dicom_config
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_fragmented_frames
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    SecondaryCaptureImageStorage,
)

from pipeline import codestream
from pipeline.errors import FailedImage, IncompleteFile, RejectedImage
from pipeline.limits import MAX_DECODED_BYTES, MAX_PIXELS, MIN_SIDE
from pipeline.types import DicomAttributes

#: Modalities of projection radiographs (PS3.3 C.7.3.1.1.1 defined terms).
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX"})
#: Body Part Examined values (PS3.16 Annex L) that denote the chest.
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LUNG"})
#: View Position values (PS3.3 C.8.11.5.1.1 / C.8.19.6.x) that are lateral projections.
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT", "LLD", "RLD"})
FRONTAL_VIEWS = frozenset({"PA", "AP"})
GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})
#: Transfer syntaxes decoded at reduced resolution when the caller asks for it.
REDUCIBLE_J2K = frozenset({JPEG2000Lossless, JPEG2000})
REDUCIBLE_JPEG = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit})  # 8-bit frames only


def configure_pydicom() -> None:
    """Process-wide pydicom settings; called once by each process entry point, never at import.

    pydicom's validation warnings quote element values (UIDs, names), which must never reach
    logs; and a value whose length contradicts its VR is read as UN instead of failing the file.
    """
    dicom_config.settings.reading_validation_mode = dicom_config.IGNORE
    dicom_config.convert_wrong_length_to_UN = True


#: Age String (PS3.5 6.2, VR AS): ``nnnD|W|M|Y``. Leniently, a bare number (no unit letter, as converted
#: data sets write it: "81", "62") is read as years, and the unit may be lower case or spaced.
_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def parse_age_years(value: object) -> float | None:
    """Age String (PS3.5 6.2, VR AS: ``nnnD|W|M|Y``, or a bare number of years) in years, or None."""
    if isinstance(value, bytes):  # an element read as UN (its length contradicted its VR)
        value = value.decode("ascii", "replace")
    match = _AGE.match(str(value or ""))
    return int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()] if match else None


def age_between(birth: date | None, on: date | None) -> float | None:
    """Age in years on the day ``on`` of someone born on ``birth`` (whole calendar years, then the
    days since the last birthday as a fraction), or None when a date is missing or ``on`` is earlier."""
    if birth is None or on is None or on < birth:
        return None
    years = on.year - birth.year - ((on.month, on.day) < (birth.month, birth.day))
    try:
        last = birth.replace(year=birth.year + years)
    except ValueError:  # born on 29 February: the birthday is 1 March in other years
        last = date(birth.year + years, 3, 1)
    return years + (on - last).days / 365.25


def patient_age_years(ds: Dataset) -> float | None:
    """PatientAge (0010,1010); when it is absent or unreadable, the age derived from PatientBirthDate
    and the day the film was taken (StudyDate, else AcquisitionDate)."""
    age = parse_age_years(ds.get("PatientAge"))
    if age is not None:
        return age
    taken = parse_date(ds.get("StudyDate")) or parse_date(ds.get("AcquisitionDate"))
    return age_between(parse_date(ds.get("PatientBirthDate")), taken)


#: Date (PS3.5 6.2, VR DA): ``YYYYMMDD``; also the ACR-NEMA 2.0 form ``YYYY.MM.DD`` that old files carry.
_DATE = re.compile(r"^\s*(\d{4})\.?(\d{2})\.?(\d{2})\s*$")


def parse_date(value: object) -> date | None:
    """A DA value as a date, or None when it is absent, empty, multi-valued or not a real day.

    A bad date in a header is a bad label on a good film: it must never fail the film.
    """
    if isinstance(value, bytes):  # an element read as UN (its length contradicted its VR)
        value = value.decode("ascii", "replace")
    match = _DATE.match(str(value or ""))
    if not match:
        return None
    try:
        return date(*(int(part) for part in match.groups()))
    except ValueError:  # month 13, 30 February, year 0000
        return None


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
        patient_age_years=patient_age_years(ds),
        modality=(_text(ds, "Modality") or "").upper() or None,
        view_position=(_text(ds, "ViewPosition") or "").upper() or None,
        study_date=parse_date(ds.get("StudyDate")),
        body_part=(_text(ds, "BodyPartExamined") or "").upper() or None,
        photometric=(_text(ds, "PhotometricInterpretation") or "").upper() or None,
        transfer_syntax=str(ts) if ts else None,
    )


def _read_dataset(source: Path | bytes) -> Dataset:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(source, bytes | bytearray | memoryview):
                ds = pydicom.dcmread(io.BytesIO(source), force=True)  # already in memory: no deferral
            else:
                ds = pydicom.dcmread(source, force=True, defer_size="2 MB")
            ds.get("PixelData")  # force lazy reading of the header up to the pixels
    except (InvalidDicomError, EOFError) as exc:
        raise IncompleteFile(f"DICOM data set ends early: {exc}") from exc
    except (zlib.error, OSError, ValueError, KeyError, TypeError, AttributeError, OverflowError) as exc:
        raise FailedImage(f"corrupt DICOM header: {type(exc).__name__}: {exc}") from exc
    if len(ds) == 0:
        raise FailedImage("no DICOM data elements could be read")
    ensure_transfer_syntax(ds)
    return ds


def ensure_transfer_syntax(ds: Dataset) -> None:
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


def _first_frame(ds: Dataset) -> bytes | None:
    """The single frame of encapsulated Pixel Data (PS3.5 A.4: items after the Basic Offset Table)."""
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated or "PixelData" not in ds:
        return None
    try:
        fragments = next(generate_fragmented_frames(ds.PixelData, number_of_frames=1), ())
    except (ValueError, TypeError, KeyError, IndexError, EOFError, StopIteration) as exc:
        raise FailedImage(f"encapsulated pixel data cannot be read: {str(exc)[:120]}") from exc
    return b"".join(fragments) or None


def check_codestream(ds: Dataset, frame: bytes | None) -> codestream.CodestreamHeader | None:
    """Refuse a compressed frame whose own header declares more pixels than may be allocated.

    Rows/Columns were checked by :func:`check_dimensions`, but a JPEG, JPEG-LS or JPEG 2000
    decoder allocates what the codestream's frame header (SOF, SOF55, SIZ) says.
    """
    if frame is None:
        return None
    header = codestream.read_header(frame)
    if header is None:
        return None  # RLE or an unknown stream: its decoder allocates from Rows/Columns
    pixels = header.width * header.height
    declared = _int(ds, "Rows", 0) * _int(ds, "Columns", 0)
    if pixels > MAX_PIXELS or pixels * header.components > declared * max(_int(ds, "SamplesPerPixel", 1), 1):
        raise FailedImage(
            f"compressed frame declares {header.width}x{header.height}x{header.components}, more than "
            "the data set's Rows x Columns or the decode limit (possible decompression bomb)"
        )
    return header


def _decode_reduced(
    ds: Dataset, frame: bytes | None, header: codestream.CodestreamHeader | None, min_side: int
) -> tuple[np.ndarray, int] | None:
    """Stored values at reduced resolution and the JPEG 2000 reduction levels they were decoded at
    (0 for JPEG), or None where the full-resolution path must be used."""
    if frame is None or header is None or header.components != 1:
        return None
    ts = ds.file_meta.TransferSyntaxUID
    side = min(header.width, header.height)
    from PIL import Image

    from pipeline.raster import set_j2k_reduce

    try:
        levels = 0
        if ts in REDUCIBLE_J2K and header.kind == "jpeg2000" and not header.signed and header.precision <= 16:
            levels = codestream.reduction_levels(
                side, min_side * codestream.J2K_MIN_SIDE_FACTOR, header.levels
            )
            if levels == 0:
                return None
            with Image.open(io.BytesIO(frame)) as image:
                set_j2k_reduce(image, levels)
                image.load()
                values = np.asarray(image)
            if image.mode.startswith("I;16"):  # OpenJPEG output is scaled up to 16 bits by Pillow
                values = values >> (16 - header.precision)
        elif ts in REDUCIBLE_JPEG and header.kind == "jpeg" and header.precision == 8:
            target = min_side * codestream.JPEG_MIN_SIDE_FACTOR
            if side < 2 * target:
                return None  # DCT scaling cannot go below 1/2 here: nothing to gain
            with Image.open(io.BytesIO(frame)) as image:
                image.draft("L", (target, target))
                values = np.asarray(image.convert("L"))
        else:
            return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return None  # let the standard decoder fail with its own reason
    if values.ndim != 2:
        return None
    return values.astype(np.uint8 if _int(ds, "BitsAllocated", 16) <= 8 else np.uint16), levels


def has_linear_luts(ds: Dataset) -> bool:
    """True when the modality and VOI stages are (piecewise) linear functions of the stored value:
    a Rescale Slope/Intercept (or none) and a LINEAR window (or none), no LUT tables. Binning the
    stored values first then only changes rounding and the values next to the window's clip."""
    function = str(ds.get("VOILUTFunction", "") or "LINEAR").upper()
    return (
        "ModalityLUTSequence" not in ds
        and "VOILUTSequence" not in ds
        and function in ("LINEAR", "LINEAR_EXACT")
    )


def _binned(pixels: np.ndarray, min_side: int) -> np.ndarray:
    from pipeline.raster import bin_down

    binned = bin_down(pixels, min_side)
    return pixels if binned is None else binned


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


def decode_dicom(
    source: str | Path | bytes, *, min_side: int | None = None
) -> tuple[np.ndarray, DicomAttributes]:
    """Decode one DICOM file (a path, or its bytes) into display grey levels and its attributes.

    With ``min_side``, JPEG 2000 and 8-bit JPEG frames are decoded at the smallest resolution
    whose short side is still at least ``min_side`` (see the module docstring).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = _read_dataset(source if isinstance(source, bytes) else Path(source))
            attrs = read_attributes(ds)
            check_scope(ds, attrs)
            check_dimensions(ds)
            frame = _first_frame(ds)
            header = check_codestream(ds, frame)
            reduced = _decode_reduced(ds, frame, header, min_side) if min_side else None
            if reduced is None:
                pixels, levels = _decode_pixels(ds), 0
                if min_side and has_linear_luts(ds):
                    pixels = _binned(pixels, min_side)
            else:
                pixels, levels = reduced
            from pipeline.raster import realign_j2k  # Pillow is kept off a command's start

            return realign_j2k(to_display_grey(pixels, ds), levels), attrs
    except (FailedImage, RejectedImage, MemoryError, KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - lazy parsing surfaces damage anywhere; Rust decoders
        # (pylibjpeg-rle via pyo3) raise PanicException, a BaseException, on crafted pixel data.
        raise FailedImage(f"corrupt DICOM data set ({type(exc).__name__})") from exc


def read_header(path: str | Path) -> DicomAttributes:
    """Attributes alone, without touching pixel data (for listings and diagnostics)."""
    return read_attributes(_read_dataset(Path(path)))
