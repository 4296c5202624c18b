"""pipeline.png: plain grey PNG films decoded by Wuffs give Pillow's levels; anything else, and
every damaged or truncated file, is left to Pillow (issue 13)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline import png, raster
from pipeline.errors import FailedImage, IncompleteFile


@pytest.fixture(scope="module")
def film(kermany) -> np.ndarray:
    path = sorted((kermany / "NORMAL").glob("*.jpeg"))[0]
    return np.asarray(Image.open(path).convert("L"))


def _png(image: Image.Image, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", **options)
    return out.getvalue()


def _pillow_levels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


def _chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, position = [], 8
    while position < len(data):
        (length,) = struct.unpack_from(">I", data, position)
        chunks.append((data[position + 4 : position + 8], data[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def _assemble(chunks: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(
        struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        for kind, payload in chunks
    )
    return png.SIGNATURE + body


def _with_chunk(data: bytes, kind: bytes, payload: bytes) -> bytes:
    chunks = _chunks(data)
    return _assemble([chunks[0], (kind, payload), *chunks[1:]])


def _sixteen_bit(film: np.ndarray, shape: tuple[int, int]) -> Image.Image:
    tiled = np.resize(film.astype(np.uint16) * 257 + 3, shape)  # all 16 bits in use
    return Image.fromarray(tiled.astype(np.uint16))


@pytest.mark.parametrize("shape", [(224, 224), (1001, 777), (2048, 1841)])
@pytest.mark.parametrize("depth", [8, 16])
@pytest.mark.parametrize("options", [{}, {"compress_level": 1}, {"optimize": True}])
def test_wuffs_gives_pillows_levels(film, shape, depth, options):
    image = Image.fromarray(np.resize(film, shape)) if depth == 8 else _sixteen_bit(film, shape)
    data = _png(image, **options)
    levels = png.grey_levels(data, shape[1], shape[0])
    assert levels is not None, "a plain grey PNG takes the Wuffs path"
    assert levels.dtype == (np.uint8 if depth == 8 else np.uint16)
    np.testing.assert_array_equal(levels, _pillow_levels(data))


@pytest.mark.parametrize("min_side", [128, 512])
def test_reduced_decode_is_the_same_with_either_decoder(film, min_side, monkeypatch):
    data = _png(_sixteen_bit(film, (1500, 1400)))
    fast = raster.decode_raster(data, min_side=min_side)
    monkeypatch.setattr(png, "grey_levels", lambda *_: None)
    np.testing.assert_array_equal(fast, raster.decode_raster(data, min_side=min_side))


def test_what_changes_meaning_is_left_to_pillow(film):
    grey = _png(Image.fromarray(film))
    exif = Image.Exif()
    exif[0x0112] = 6
    cases = {
        "colour": _png(Image.fromarray(film).convert("RGB")),
        "palette": _png(Image.fromarray(film).convert("P")),
        "grey and alpha": _png(Image.fromarray(film).convert("LA")),
        "1-bit": _png(Image.fromarray(film).convert("1")),
        "transparency key": _with_chunk(grey, b"tRNS", b"\x00\x00"),
        "EXIF chunk": _png(Image.fromarray(film), exif=exif),
        "ImageMagick EXIF text": _with_chunk(grey, b"tEXt", b"Raw profile type exif\x00\nexif\n4\n00000000"),
    }
    for name, data in cases.items():
        width, height = Image.open(io.BytesIO(data)).size
        assert png.grey_levels(data, width, height) is None, name
    assert png.grey_levels(grey, film.shape[1], film.shape[0]) is not None


def test_damaged_and_truncated_files_fail_as_before(film):
    data = bytearray(_png(Image.fromarray(film)))
    idat = data.index(b"IDAT")
    flipped = bytes(data[: idat + 40]) + bytes([data[idat + 40] ^ 0x10]) + bytes(data[idat + 41 :])
    assert png.grey_levels(flipped, *film.shape[::-1]) is None  # Wuffs would not see the bad CRC
    with pytest.raises(FailedImage):
        raster.decode_raster(flipped, min_side=64)
    truncated = bytes(data[: len(data) // 2])
    assert png.grey_levels(truncated, *film.shape[::-1]) is None
    with pytest.raises(IncompleteFile):
        raster.decode_raster(truncated, min_side=64)
