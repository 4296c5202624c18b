"""Headers of compressed codestreams, read before any decoder allocates pixels.

DICOM encapsulates compressed frames (PS3.5 Annex A.4) whose own headers, not the data set's
Rows/Columns, decide how much memory a decoder allocates. A 256x256 data set can carry a
16000x16000 JPEG frame: so the frame header is read here and checked against the limits, and
the reduced-resolution decoders learn the true size and precision from it.

* JPEG (ISO/IEC 10918-1 B.2.2, PS3.5 A.4.1/A.4.3): a Start Of Frame marker (SOF0-SOF15 except
  DHT 0xC4, JPG 0xC8 and DAC 0xCC) gives precision, lines (height), samples per line (width) and
  the number of components.
* JPEG-LS (ISO/IEC 14495-1 C.2.2, PS3.5 A.4.3): SOF55 (0xFFF7), same layout.
* JPEG 2000 (ISO/IEC 15444-1 A.5.1 SIZ and A.6.1 COD, PS3.5 A.4.4): image and offset sizes, per
  component precision and signedness, and the number of wavelet decomposition levels, which
  bounds how far the decoder can reduce the resolution.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pipeline.formats import J2K_CODESTREAM as J2K_SOC_SIZ
from pipeline.formats import JP2_SIGNATURE

JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_LS_SOF = 0xF7
#: Reduced decodes keep the short side >= factor x the model's input size. Decoding JPEG 2000 at the
#: highest level still >= the input size adds the wavelet low-pass to the resize filter's blur and
#: moved P(pneumonia) of the real NEMA RG1 chest film by 0.050 (2x: 0.016, 4x: 0.006). DCT scaling
#: of the bench corpus's 105 JPEG films (2048 px) moved scores by up to 0.023 at 2x (1/8 scale) and
#: 0.0065 at 4x (1/4 scale, 4.8 instead of 3.5 ms per film). The score tests allow 0.01.
J2K_MIN_SIDE_FACTOR = 4
JPEG_MIN_SIDE_FACTOR = 4
#: The same floor for block-averaging a full-resolution decode (16-bit PNG, uncompressed DICOM)
#: before the float grey-level chain (:func:`pipeline.raster.bin_down`).
BIN_MIN_SIDE_FACTOR = 4
#: Bytes searched for the SIZ marker inside a JP2 wrapper (header boxes come first).
JP2_SEARCH_BYTES = 1 << 16


@dataclass(frozen=True)
class CodestreamHeader:
    kind: str  # "jpeg", "jpeg-ls" or "jpeg2000"
    width: int
    height: int
    components: int
    precision: int
    signed: bool = False
    #: JPEG 2000 only: wavelet decomposition levels (the most a decoder may reduce by).
    levels: int = 0


def read_header(stream: bytes | memoryview) -> CodestreamHeader | None:
    """The frame header of a JPEG, JPEG-LS or JPEG 2000 codestream; None if none is found."""
    if bytes(stream[:2]) == b"\xff\xd8":
        return _jpeg_header(stream)  # walks segment lengths: a huge APPn cannot hide the SOF
    data = bytes(stream[:JP2_SEARCH_BYTES])
    if data.startswith(JP2_SIGNATURE):
        start = data.find(J2K_SOC_SIZ)
        return _j2k_header(data[start:]) if start >= 0 else None
    if data.startswith(J2K_SOC_SIZ):
        return _j2k_header(data)
    return None


def _jpeg_header(data: bytes | memoryview) -> CodestreamHeader | None:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return None
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte (B.1.1.2)
            offset += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            offset += 2
            continue
        (length,) = struct.unpack(">H", bytes(data[offset + 2 : offset + 4]))
        if marker in JPEG_SOF_MARKERS or marker == JPEG_LS_SOF:
            if offset + 10 > len(data):
                return None
            precision, height, width, components = struct.unpack(
                ">BHHB", bytes(data[offset + 4 : offset + 10])
            )
            kind = "jpeg-ls" if marker == JPEG_LS_SOF else "jpeg"
            return CodestreamHeader(kind, width, height, components, precision)
        if marker in (0xDA, 0xD9):  # scan or end of image before any frame header
            return None
        offset += 2 + length
    return None


def _j2k_header(data: bytes) -> CodestreamHeader | None:
    if len(data) < 4 + 38 + 3:
        return None
    siz = data[4:]
    (length,) = struct.unpack(">H", siz[:2])
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", siz[4:20])
    (components,) = struct.unpack(">H", siz[36:38])
    if components < 1:
        return None
    ssiz = siz[38]
    header = CodestreamHeader(
        kind="jpeg2000",
        width=max(xsiz - xosiz, 0),
        height=max(ysiz - yosiz, 0),
        components=components,
        precision=(ssiz & 0x7F) + 1,
        signed=bool(ssiz & 0x80),
    )
    return _with_levels(header, data, 4 + length)  # SOC, SIZ marker, then Lsiz bytes


def _with_levels(header: CodestreamHeader, data: bytes, offset: int) -> CodestreamHeader:
    """Walk the main header to COD (A.6.1) for the decomposition levels (SPcod, first byte)."""
    while offset + 4 <= len(data) and data[offset] == 0xFF:
        marker = data[offset + 1]
        (length,) = struct.unpack(">H", data[offset + 2 : offset + 4])
        if marker == 0x52 and offset + 10 <= len(data):
            levels = data[offset + 9]
            return CodestreamHeader(**{**header.__dict__, "levels": levels})
        if marker == 0x90:  # SOT: the main header has ended without COD
            break
        offset += 2 + length
    return header


def reduction_levels(side: int, min_side: int, available: int) -> int:
    """Highest JPEG 2000 reduction whose short side (ceil(side / 2^r), B.5) stays >= ``min_side``."""
    levels = 0
    while levels < available and reduced_side(side, levels + 1) >= min_side:
        levels += 1
    return levels


def reduced_side(side: int, levels: int) -> int:
    """Size of a component with offset 0 after discarding ``levels`` resolution levels."""
    return (side + (1 << levels) - 1) >> levels
