"""PNG, JPEG and JPEG 2000 decoding with Pillow into display-ready grey levels in [0, 1].

Sizes are checked from the header before any pixel is decoded, so a
decompression bomb is refused without allocating its buffer.

With ``min_side`` (the model's input size), JPEG is decoded with DCT scaling
(Pillow ``draft``: 1/2, 1/4 or 1/8) and JPEG 2000 at a reduced wavelet level
(Pillow ``reduce``), each to the smallest size whose short side is still at
least ``min_side`` times a per-codec safety factor
(:data:`pipeline.codestream.J2K_MIN_SIDE_FACTOR`, ``JPEG_MIN_SIDE_FACTOR``);
PNG has no such shortcut in its decoder: an 8-bit or 16-bit grey PNG is decoded in full (by
Wuffs, :mod:`pipeline.png`, when it is a plain one) and binned (:func:`bin_down`, integer block
means) before the float conversion.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from pipeline import codestream
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


def bin_factor(width: int, height: int, min_side: int) -> int:
    """Side of the square blocks averaged by :func:`bin_down`: the largest that keeps the short
    side at least ``min_side`` times :data:`pipeline.codestream.BIN_MIN_SIDE_FACTOR`."""
    return max(1, min(width, height) // (min_side * codestream.BIN_MIN_SIDE_FACTOR))


def bin_down(values: np.ndarray, min_side: int) -> np.ndarray | None:
    """Mean of k x k blocks of unsigned 8/16-bit stored values (integer result, rounded half up;
    blocks at the right and bottom edges average the pixels they have, as Pillow ``reduce``),
    or None when there is nothing to gain or the type is not one binned here.

    Averaging commutes with every linear grey-level map (a modality rescale, the min-max scaling
    to [0, 1], MONOCHROME1 inversion, per-image standardisation), so applying it first changes the
    model input only by rounding (to the stored integer level) and by the bilinear resize starting
    from the binned image; the float chain then runs on 1/k^2 of the pixels.
    """
    if values.ndim != 2 or values.dtype.kind != "u" or values.dtype.itemsize > 2:
        return None
    height, width = values.shape
    k = bin_factor(width, height, min_side)
    if k < 2:
        return None
    if values.dtype.itemsize == 1:  # Pillow's 8-bit reduce is the faster one here
        return np.asarray(Image.fromarray(np.ascontiguousarray(values)).reduce(k))
    return block_means(values, k)


def block_means(values: np.ndarray, k: int) -> np.ndarray:
    """k x k block means of 2-D unsigned 16-bit values, summed in 32 bits: the same integers as
    Pillow's ``convert("I").reduce(k)``, in a quarter of its time (no 32-bit copy of the image)."""
    height, width = values.shape
    rows = values[0::k].astype(np.uint32)
    for offset in range(1, k):
        part = values[offset::k]
        rows[: len(part)] += part
    sums = rows[:, 0::k].copy()
    for offset in range(1, k):
        part = rows[:, offset::k]
        sums[:, : part.shape[1]] += part
    per_row = np.full(len(sums), k, np.uint32)
    per_row[-1] = height - (len(sums) - 1) * k
    per_column = np.full(sums.shape[1], k, np.uint32)
    per_column[-1] = width - (sums.shape[1] - 1) * k
    counts = per_row[:, np.newaxis] * per_column[np.newaxis, :]
    return ((sums + counts // 2) // counts).astype(np.uint16)


def _binned_grey(image: Image.Image, min_side: int) -> np.ndarray | None:
    """Grey levels of an 8-bit or 16-bit grey PNG binned before the float conversion (see bin_down)."""
    peak = {"L": 255.0, "I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0}.get(image.mode)
    k = bin_factor(*image.size, min_side)
    if peak is None or k < 2:
        return None
    binned = image.reduce(k) if image.mode == "L" else block_means(np.asarray(image), k)
    return np.asarray(binned, dtype=np.float32) / peak


def _fast_png(image: Image.Image, data: bytes | None, min_side: int | None) -> np.ndarray | None:
    """A plain grey PNG decoded by Wuffs (:mod:`pipeline.png`) and binned as :func:`_binned_grey`
    bins Pillow's decode (the same values), or None. Only on the reduced path: the full-resolution
    switch keeps Pillow, the decoder every film had before, for checking."""
    if not min_side or data is None or image.format != "PNG":
        return None
    from pipeline import png

    levels = png.grey_levels(data, *image.size)
    if levels is None:
        return None
    binned = bin_down(levels, min_side)
    peak = 255.0 if levels.dtype == np.uint8 else 65535.0
    return np.asarray(levels if binned is None else binned, dtype=np.float32) / peak


def _reduce(image: Image.Image, data: bytes | None, min_side: int) -> int:
    """Ask the decoder for the smallest resolution whose short side stays >= ``min_side``; returns
    the JPEG 2000 reduction levels set (0 for JPEG and anything else)."""
    if image.format == "JPEG":
        target = min_side * codestream.JPEG_MIN_SIDE_FACTOR
        image.draft(image.mode, (target, target))
    elif image.format == "JPEG2000" and data is not None:
        header = codestream.read_header(data)
        if header is not None:
            target = min_side * codestream.J2K_MIN_SIDE_FACTOR
            levels = codestream.reduction_levels(min(image.size), target, header.levels)
            set_j2k_reduce(image, levels)
            return max(levels, 0)
    return 0


def realign_j2k(grey: np.ndarray, levels: int) -> np.ndarray:
    """Move a JPEG 2000 image decoded ``levels`` resolution levels down onto the pixel grid that
    block-reduction (and the resize in :func:`pipeline.normalise.to_model_input`) assume.

    The low-pass sample n of each wavelet level stands at sample 2n of the level above (ISO/IEC
    15444-1 Annex F, image origin 0), so reduced pixel n is centred on full-resolution pixel
    2^L n, not on the middle of the block it stands for, 2^L n + (2^L - 1) / 2: the reduced image
    is shifted by (2^L - 1) / 2^(L+1) of its own pixels. Uncorrected, that shift moved P(pneumonia)
    by up to 0.033 against full decoding on the benchmark's JPEG 2000 films (bench/RESULTS.md);
    resampling it back (bilinear, edge pixels repeated) brings that under 0.006.
    """
    if levels <= 0:
        return grey
    shift = ((1 << levels) - 1) / (1 << (levels + 1))
    height, width = grey.shape
    padded = np.pad(np.asarray(grey, dtype=np.float32), ((0, 1), (0, 1)), mode="edge")
    box = (shift, shift, width + shift, height + shift)
    resampled = Image.fromarray(padded, mode="F").resize((width, height), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resampled, dtype=np.float32)


def set_j2k_reduce(image: Image.Image, levels: int) -> None:
    """Decode a JPEG 2000 image ``levels`` resolution levels down.

    Pillow 13 computes the reduced size as round(size / 2^levels), OpenJPEG produces
    ceil(size / 2^levels) (ISO/IEC 15444-1 B.5): for sizes where the two differ (1841 px at
    level 3) the decode fails with "broken data stream". Pre-adjusting the size Pillow starts
    from makes its rounding land on OpenJPEG's ceiling.
    """
    if levels <= 0:
        return
    power = 1 << levels
    width, height = (codestream.reduced_side(side, levels) * power - (power >> 1) for side in image.size)
    image._size = (width, height)  # noqa: SLF001 - see the docstring; undone by load()
    image.reduce = levels


def decode_raster(source: str | Path | bytes, *, min_side: int | None = None) -> np.ndarray:
    """Decode a PNG, JPEG or JPEG 2000 file (path or bytes) into 2-D float32 in [0, 1] (0 = black)."""
    data = source if isinstance(source, bytes) else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data) if data is not None else source) as image:
                _check_size(*image.size)
                fast = _fast_png(image, data, min_side)
                if fast is not None:
                    return fast
                levels = _reduce(image, data, min_side) if min_side else 0
                image.load()
                # In place: without an orientation tag, exif_transpose would return a copy (6 ms for a
                # 2048 px 16-bit PNG). JPEG 2000 carries no EXIF orientation.
                ImageOps.exif_transpose(image, in_place=True)
                binned = _binned_grey(image, min_side) if min_side else None
                return realign_j2k(binned if binned is not None else _to_grey(image), levels)
    except (RejectedImage, FailedImage):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise FailedImage(f"decompression bomb refused: {exc}") from exc
    except OSError as exc:
        message = _without_path(str(exc))
        if "truncated" in message or "broken data stream" in message:
            raise IncompleteFile(f"truncated image data: {message}") from exc
        raise FailedImage(f"cannot decode image: {message}") from exc
    except (ValueError, SyntaxError, EOFError) as exc:
        raise FailedImage(f"corrupt image: {_without_path(str(exc))}") from exc


def _without_path(message: str) -> str:
    """Pillow quotes the file name in some errors; a path is a patient identifier."""
    return message.split(" '", 1)[0] if "cannot identify image file" in message else message
