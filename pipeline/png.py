"""Grey PNG films decoded by Wuffs: the same stored levels as Pillow, in about 3/4 of its CPU.

A 2048 px grey PNG spends most of its decode in zlib's inflate and in undoing the per-row
filters (ISO/IEC 15948 / W3C PNG section 9; encoders choose Paeth for almost every row of a
radiograph, and Paeth must be undone byte by byte). Wuffs ("Wrangling Untrusted File Formats
Safely", Google; memory-safe by construction, which suits files from outside) does both faster:
8-bit 36 -> 27 ms, 16-bit 53 -> 38 ms per 2048 px film on the benchmark's VM
(bench/RESULTS.md, issue 13). Its levels are Pillow's, bit for bit (tested).

Only the plain case is taken here: 8 or 16-bit greyscale (colour type 0) without a
transparency key or an EXIF chunk, every chunk's CRC intact (Wuffs ignores checksums, so they
are checked here first: a damaged film must fail, not decode to other pixels), ending in IEND.
Anything else returns None and is decoded by Pillow exactly as before, which also gives the
reason a damaged or truncated file is refused.
"""

from __future__ import annotations

import struct
import threading
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_GREY = 0  # IHDR colour type (PNG section 11.2.2)
#: Chunks that change what the grey levels mean or where they go: left to Pillow.
_LEFT_TO_PILLOW = {b"tRNS", b"eXIf"}
#: ImageMagick's way of carrying EXIF (an orientation, perhaps) in a text chunk, read by Pillow.
_TEXT_CHUNKS, _EXIF_TEXT = {b"tEXt", b"zTXt", b"iTXt"}, b"Raw profile type exif"


def _plain_grey_depth(data: bytes | memoryview) -> int | None:
    """Bit depth (8 or 16) of a plain grey PNG whose chunks are all intact, else None."""
    if data[:8] != SIGNATURE:
        return None
    data = memoryview(data)
    position, depth, end = 8, None, len(data)
    while position + 12 <= end:
        length, kind = struct.unpack_from(">I4s", data, position)
        body_end = position + 8 + length
        if body_end + 4 > end:
            return None  # truncated
        (crc,) = struct.unpack_from(">I", data, body_end)
        if zlib.crc32(data[position + 4 : body_end]) != crc or kind in _LEFT_TO_PILLOW:
            return None
        if kind in _TEXT_CHUNKS and bytes(data[position + 8 : position + 8 + len(_EXIF_TEXT)]) == _EXIF_TEXT:
            return None
        if kind == b"IHDR":
            bits, colour = data[position + 16], data[position + 17]
            depth = bits if colour == _GREY and bits in (8, 16) else None
            if depth is None:
                return None
        if kind == b"IEND":
            return depth
        position = body_end + 4
    return None  # no IEND: truncated or still being written


_per_thread = threading.local()


def _decoder(depth: int):
    """This thread's Wuffs decoder for ``depth``-bit grey (a decoder holds state between calls)."""
    decoders = _per_thread.__dict__.setdefault("decoders", {})
    if depth not in decoders:
        from pywuffs import ImageDecoderType, PixelFormat
        from pywuffs.aux import ImageDecoder, ImageDecoderConfig

        config = ImageDecoderConfig()
        config.enabled_decoders = [ImageDecoderType.PNG]
        config.pixel_format = PixelFormat.Y if depth == 8 else PixelFormat.Y_16LE
        decoders[depth] = ImageDecoder(config)
    return decoders[depth]


def grey_levels(data: bytes, width: int, height: int) -> np.ndarray | None:
    """Stored levels (``uint8`` or ``uint16``, ``height`` x ``width``) of a plain grey PNG whose
    header Pillow has already checked (size limits), or None: then Pillow decodes it."""
    depth = _plain_grey_depth(data)
    if depth is None:
        return None
    try:
        result = _decoder(depth).decode(data)
    except ImportError:  # no Wuffs wheel for this platform
        return None
    if result.error_message:
        return None
    levels = result.pixbuf.view("<u2") if depth == 16 else result.pixbuf
    if levels.size != width * height:
        return None
    return levels.reshape(height, width).astype(np.uint16 if depth == 16 else np.uint8, copy=False)
