"""Detect the container format from the first bytes of a file, not its name.

DICOM files are recognised with the 128-byte preamble and ``DICM`` prefix of
PS3.10 section 7.1, and also without them (raw data sets as written by some
older modalities, PS3.10 section 7.2 notwithstanding): a plausible first data
element tag of group 0x0002 or 0x0008 in little or big endian. JPEG 2000 files are
recognised as a JP2 file (ISO/IEC 15444-1 I.5.1 signature box) or a bare codestream
(SOC followed by SIZ, A.4.1 / A.5.1).
"""

from __future__ import annotations

import enum
import struct
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
J2K_CODESTREAM = b"\xff\x4f\xff\x51"
HEADER_BYTES = 132


class ImageFormat(enum.StrEnum):
    DICOM = "dicom"
    PNG = "png"
    JPEG = "jpeg"
    JPEG2000 = "jpeg2000"
    UNKNOWN = "unknown"


def _looks_like_raw_dicom(head: bytes) -> bool:
    """A data set without preamble starts with a low group tag and a sane VR/length."""
    if len(head) < 8:
        return False
    for fmt in ("<HH", ">HH"):
        group, element = struct.unpack(fmt, head[:4])
        if group in (0x0002, 0x0008) and element < 0x0100:
            vr = head[4:6]
            if vr.isalpha() and vr.isupper():
                return True  # explicit VR
            (length,) = struct.unpack(fmt[0] + "I", head[4:8])
            if length < 0x10000:
                return True  # implicit VR with a short first element
    return False


def detect_format(head: bytes) -> ImageFormat:
    """Classify a file by its first :data:`HEADER_BYTES` bytes."""
    if len(head) >= 132 and head[128:132] == b"DICM":
        return ImageFormat.DICOM
    if head.startswith(PNG_SIGNATURE):
        return ImageFormat.PNG
    if head.startswith(JPEG_SOI):
        return ImageFormat.JPEG
    if head.startswith(JP2_SIGNATURE) or head.startswith(J2K_CODESTREAM):
        return ImageFormat.JPEG2000
    if _looks_like_raw_dicom(head):
        return ImageFormat.DICOM
    return ImageFormat.UNKNOWN


def detect_file_format(path: str | Path) -> ImageFormat:
    with open(path, "rb") as handle:
        return detect_format(handle.read(HEADER_BYTES))
