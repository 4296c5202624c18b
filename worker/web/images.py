"""Pictures of a film for the page: the film as the model saw it, thumbnails, the Grad-CAM overlay.

A film is read from the path its content was most recently seen at, and only if the bytes there
still hash to the film's SHA-256: a replaced file must never be shown under another film's row.

Decoding costs the web process memory and time, so a picture is decoded only as large as it is
shown (``min_side``: JPEG 2000 and JPEG decoders skip the resolution levels they would throw
away), at most :data:`MAX_CONCURRENT_DECODES` at once (a request that waits longer than
:data:`DECODE_WAIT_S` for its turn gets :class:`DecoderBusy`, a 503), and the rendered PNGs are
kept in a small in-memory cache bounded in bytes. :func:`film_pixels` is the one entry for any
page that shows a film (a 64 px thumbnail or a 2048 px reading-room view).
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from db.paths import from_db
from pipeline.decode import decode_bytes, read_file
from pipeline.errors import ImageProblem
from pipeline.hashing import sha256_bytes
from pipeline.normalise import resize_square

DISPLAY_SIZE = 512
THUMB_SIZE = 64
MAX_CONCURRENT_DECODES = 2
DECODE_WAIT_S = 20.0
#: Grad-CAM runs the model's gradients on the CPU: one at a time.
_cam_lock = threading.Lock()
_decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)


class FilmUnavailable(Exception):
    """The content is no longer at any known path (moved, replaced, unreadable)."""


class DecoderBusy(Exception):
    """Every decode slot stayed taken for :data:`DECODE_WAIT_S`: answer 503, try again later."""


class _ByteCache:
    """A least-recently-used cache of PNG bytes with a total size bound."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: tuple) -> bytes | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: tuple, value: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._size += len(value)
            while self._size > self.max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)


_cache = _ByteCache(48 * 1024 * 1024)


def film_pixels(sha256: str, stored_paths: list[str], min_side: int | None) -> np.ndarray:
    """Grey pixels in [0, 1] of the first known path whose content is still this film, decoded
    at the smallest resolution whose short side is at least ``min_side`` (None: full resolution)."""
    if not _decode_slots.acquire(timeout=DECODE_WAIT_S):
        raise DecoderBusy()
    try:
        for stored in stored_paths:
            for candidate in from_db(stored):
                try:
                    if not Path(candidate).is_file():
                        continue
                    data = read_file(candidate)  # read once: the bytes shown are the bytes hashed
                    if sha256_bytes(data) == sha256:
                        return decode_bytes(data, min_side=min_side).pixels
                except (OSError, ImageProblem):
                    continue
    finally:
        _decode_slots.release()
    raise FilmUnavailable(sha256)


def open_film(sha256: str, stored_paths: list[str]) -> np.ndarray:
    """The film at full resolution (see :func:`film_pixels`)."""
    return film_pixels(sha256, stored_paths, None)


def _png(array: np.ndarray, mode: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", optimize=mode == "L")
    return buffer.getvalue()


def film_png(sha256: str, stored_paths: list[str], size: int = DISPLAY_SIZE) -> bytes:
    """The film resized to a square, as the model's input is made (no aspect ratio kept), as PNG."""
    key = ("film", sha256, size)
    cached = _cache.get(key)
    if cached is None:
        grey = resize_square(film_pixels(sha256, stored_paths, size), size)
        cached = _png((np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8), "L")
        _cache.put(key, cached)
    return cached


def heatmap_png(sha256: str, stored_paths: list[str], model_dir: Path, size: int = DISPLAY_SIZE) -> bytes:
    """A transparent Grad-CAM overlay (jet colours, opacity following the heat) to lay over the film."""
    key = ("cam", sha256, str(model_dir), size)
    cached = _cache.get(key)
    if cached is None:
        from models.explain import gradcam
        from pipeline.colours import jet

        grey = resize_square(film_pixels(sha256, stored_paths, size), size)
        with _cam_lock:
            heat = np.clip(gradcam(model_dir, grey), 0.0, 1.0)
        rgba = np.concatenate([jet(heat), (0.6 * heat)[..., None]], axis=-1)
        cached = _png((rgba * 255).astype(np.uint8), "RGBA")
        _cache.put(key, cached)
    return cached
