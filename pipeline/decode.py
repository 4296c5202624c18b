"""Entry point of the pipeline: a file (or its bytes) in, grey pixels and attributes out.

The file is read once: callers that also need its content hash (``worker.scoring.prepare``) read the
bytes with :func:`read_file`, hash them, and decode those same bytes with :func:`decode_bytes`,
so the hash always names what was decoded.

``min_side`` asks for the smallest decode whose short side is still at least that many pixels
(the model's input size): JPEG 2000 and JPEG decoders skip resolution they would only throw
away when resizing. ``None`` decodes at full resolution.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import FailedImage, RejectedImage
from pipeline.formats import HEADER_BYTES, ImageFormat, detect_format
from pipeline.limits import MAX_FILE_BYTES
from pipeline.types import DecodedImage, DicomAttributes

__all__ = ["DecodedImage", "DicomAttributes", "decode_bytes", "decode_file", "read_file"]


def read_file(path: str | Path) -> bytes:
    """The whole file, size-checked on the open handle (no stat-then-open race)."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > MAX_FILE_BYTES:
                raise FailedImage(f"file of {size} bytes is larger than the {MAX_FILE_BYTES} byte limit")
            # Sized by the file, not by the limit: read(MAX_FILE_BYTES + 1) allocated 2 GiB of fresh
            # address space per file, and faulting in its pages cost 5x the read itself (8 MB films).
            data = handle.read(size + 1)
            if len(data) > size:  # it grew after the fstat (still being written): read on to the limit
                data += handle.read(MAX_FILE_BYTES + 1 - len(data))
    except FileNotFoundError as exc:
        raise FailedImage("file disappeared before it could be read") from exc
    except PermissionError as exc:
        raise FailedImage("no permission to read the file") from exc
    except IsADirectoryError as exc:
        raise FailedImage("not a regular file") from exc
    if len(data) > MAX_FILE_BYTES:
        raise FailedImage(f"file grew beyond the {MAX_FILE_BYTES} byte limit while it was read")
    return data


def decode_bytes(data: bytes, *, min_side: int | None = None) -> DecodedImage:
    """Decode the content of a supported file; raise :class:`pipeline.errors.ImageProblem` otherwise."""
    if not data:
        raise FailedImage("empty file")
    kind = detect_format(data[:HEADER_BYTES])
    if kind is ImageFormat.DICOM:
        from pipeline.dicom import decode_dicom  # pydicom import is kept off the raster path

        pixels, attributes = decode_dicom(data, min_side=min_side)
        return DecodedImage(pixels=pixels, source_format=kind, dicom=attributes)
    if kind in (ImageFormat.PNG, ImageFormat.JPEG, ImageFormat.JPEG2000):
        from pipeline.raster import decode_raster

        return DecodedImage(pixels=decode_raster(data, min_side=min_side), source_format=kind)
    raise RejectedImage("not a DICOM, PNG or JPEG (or JPEG 2000) file")


def decode_file(path: str | Path, *, min_side: int | None = None) -> DecodedImage:
    """Decode any supported file; raise :class:`pipeline.errors.ImageProblem` otherwise."""
    return decode_bytes(read_file(path), min_side=min_side)
