"""PNG and JPEG decoding with Pillow into display-ready grey levels in [0, 1].

Sizes are checked from the header before any pixel is decoded, so a
decompression bomb is refused without allocating its buffer.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline.errors import FailedImage, IncompleteFile, RejectedImage
from pipeline.limits import MAX_PIXELS, MIN_SIDE

#: A pixel counts as coloured when its channels differ by more than this (8-bit levels);
#: JPEG chroma subsampling of a grey film stays well below it.
COLOUR_SPREAD_LEVELS = 24
#: An image is a colour photo when more than this fraction of its pixels are coloured.
COLOUR_PIXEL_FRACTION = 0.01


def _check_size(width: int, height: int) -> None:
    if width * height > MAX_PIXELS:
        raise FailedImage(
            f"image declares {width}x{height} pixels, above the {MAX_PIXELS} pixel limit "
            "(possible decompression bomb)"
        )
    if min(width, height) < MIN_SIDE:
        raise RejectedImage(f"image too small to read: {width}x{height} (minimum side {MIN_SIDE})")


def _reject_colour(rgb: np.ndarray) -> None:
    sample = rgb[::4, ::4].astype(np.int16)
    spread = sample.max(axis=-1) - sample.min(axis=-1)
    if float(np.mean(spread > COLOUR_SPREAD_LEVELS)) > COLOUR_PIXEL_FRACTION:
        raise RejectedImage("colour image: not a greyscale radiograph")


def _to_grey(image: Image.Image) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(image, dtype=np.float32) / 65535.0
    if mode == "I":
        values = np.asarray(image, dtype=np.float32)
        peak = 65535.0 if values.max() > 255 else 255.0
        return np.clip(values / peak, 0.0, 1.0)
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        return (values - low) / (high - low) if high > low else np.zeros_like(values)
    if mode in ("L", "LA", "1"):
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    rgb = np.asarray(image.convert("RGB"))  # P, PA, RGB, RGBA, CMYK, YCbCr
    _reject_colour(rgb)
    return np.asarray(image.convert("RGB").convert("L"), dtype=np.float32) / 255.0


def decode_raster(path: str | Path) -> np.ndarray:
    """Decode a PNG or JPEG file into a 2-D float32 array in [0, 1] (0 = black)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                _check_size(*image.size)
                image.load()
                image = ImageOps.exif_transpose(image)
                return _to_grey(image)
    except (RejectedImage, FailedImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FailedImage(f"decompression bomb refused: {exc}") from exc
    except OSError as exc:
        message = str(exc)
        if "truncated" in message or "broken data stream" in message:
            raise IncompleteFile(f"truncated image data: {message}") from exc
        raise FailedImage(f"cannot decode image: {message}") from exc
    except (ValueError, SyntaxError, EOFError) as exc:
        raise FailedImage(f"corrupt image: {exc}") from exc
