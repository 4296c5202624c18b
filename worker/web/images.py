"""Pictures of a film for the page: the film for reading (true aspect ratio, up to 2048 px), thumbnails,
what the model saw, the class-activation overlay and the lung outline (the serving engine, no TensorFlow).

A film is read from the path its content was most recently seen at, and only if the bytes there
still hash to the film's SHA-256: a replaced file must never be shown under another film's row.
A picture is decoded only as large as it is shown (``min_side``: JPEG 2000 and JPEG decoders skip the
resolution levels they would throw away), at most :data:`MAX_CONCURRENT_DECODES` at once (a request
that waits longer than :data:`DECODE_WAIT_S` gets :class:`DecoderBusy`, a 503). Rendered PNGs are
kept in a small in-memory cache bounded in bytes. :func:`film_pixels` is the one entry for any
picture of a film.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
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
#: Decodes run at most this many at once in the web process; a request waits at most DECODE_WAIT_S.
MAX_CONCURRENT_DECODES = 2
DECODE_WAIT_S = 20.0
_decode_slots = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
#: The film page's picture: the stored film at up to this many pixels a side, aspect ratio kept.
VIEW_MAX_SIDE = 2048
#: Overlays (heat map, lung outline) are made at up to this size and scaled by the browser.
OVERLAY_SIDE = 512
#: Decoded films kept for the film page (a 2048 px film is 16 MB as float32).
_GREYS_KEPT = 4


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
#: Thumbnails apart, so that large film pictures never push them out (a few kB each: thousands fit).
_thumbs = _ByteCache(16 * 1024 * 1024)
#: Thumbnails are made ahead of the browser's requests, one at a time, beside the requests.
_maker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thumbnails")
_pending: set[str] = set()
_pending_lock = threading.Lock()


def film_pixels(sha256: str, stored_paths: list[str], min_side: int | None) -> np.ndarray:
    """Grey pixels in [0, 1] of the first known path whose content is still this film, decoded
    at the smallest resolution whose short side is at least ``min_side`` (None: full resolution).
    At most :data:`MAX_CONCURRENT_DECODES` run at once: :class:`DecoderBusy` after DECODE_WAIT_S."""
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


def open_film(sha256: str, stored_paths: list[str], min_side: int | None = None) -> np.ndarray:
    """The film (see :func:`film_pixels`), reduced down to ``min_side`` where the format allows it."""
    return film_pixels(sha256, stored_paths, min_side)


_grey_lock = threading.Lock()
_greys: OrderedDict[str, np.ndarray] = OrderedDict()


def film_grey(sha256: str, stored_paths: list[str]) -> np.ndarray:
    """The film at up to :data:`VIEW_MAX_SIDE` px a side (aspect ratio kept), grey levels in [0, 1];
    the last few films are kept, so that the film page, the heat map and the lung outline decode once."""
    with _grey_lock:
        if sha256 in _greys:
            _greys.move_to_end(sha256)
            return _greys[sha256]
    grey = fit_within(open_film(sha256, stored_paths, min_side=VIEW_MAX_SIDE), VIEW_MAX_SIDE)
    with _grey_lock:
        _greys[sha256] = grey
        while len(_greys) > _GREYS_KEPT:
            _greys.popitem(last=False)
    return grey


def fit_within(grey: np.ndarray, longest: int) -> np.ndarray:
    """``grey`` scaled down (never up) so that its longest side is at most ``longest``, aspect kept."""
    height, width = grey.shape
    scale = longest / max(height, width)
    if scale >= 1:
        return grey
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F")
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR), dtype=np.float32)


def _png(array: np.ndarray, mode: str, optimize: bool = True) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG", optimize=optimize and mode == "L")
    return buffer.getvalue()


def _bytes(grey: np.ndarray) -> np.ndarray:
    return (np.clip(grey, 0.0, 1.0) * 255).astype(np.uint8)


def film_png(sha256: str, stored_paths: list[str], size: int = DISPLAY_SIZE) -> bytes:
    """The film resized to a square, as the model's input is made (no aspect ratio kept), as PNG."""
    key = ("film", sha256, size)
    cached = _cache.get(key)
    if cached is None:
        grey = resize_square(film_pixels(sha256, stored_paths, size), size)  # decoded only as large as shown
        cached = _png(_bytes(grey), "L")
        _cache.put(key, cached)
    return cached


def thumbnail_png(sha256: str, stored_paths: list[str], size: int = THUMB_SIZE) -> bytes:
    """A small picture of the whole film, aspect ratio kept (longest side ``size``), made once per film."""
    key = ("thumb", sha256, size)
    cached = _thumbs.get(key)
    if cached is None:
        grey = fit_within(open_film(sha256, stored_paths, min_side=4 * size), size)
        cached = _png(_bytes(grey), "L")
        _thumbs.put(key, cached)
    return cached


def cached_thumbnail(sha256: str, size: int = THUMB_SIZE) -> bytes | None:
    """The thumbnail already made for this content, or None."""
    return _thumbs.get(("thumb", sha256, size))


def make_thumbnails(films: list[tuple[str, list[str]]]) -> None:
    """Make the thumbnails of ``films`` (sha256, stored paths) not made yet, in the background: the
    worklist calls this for the films it lists, so that a page's thumbnails are ready when asked for."""
    for sha256, stored_paths in films:
        with _pending_lock:
            if sha256 in _pending or _thumbs.get(("thumb", sha256, THUMB_SIZE)) is not None:
                continue
            _pending.add(sha256)
        _maker.submit(_make_thumbnail, sha256, stored_paths)


def _make_thumbnail(sha256: str, stored_paths: list[str]) -> None:
    try:
        thumbnail_png(sha256, stored_paths)
    except Exception:  # noqa: BLE001 - the request for it then answers 404 (or tries again)
        pass
    finally:
        with _pending_lock:
            _pending.discard(sha256)


def view_png(sha256: str, stored_paths: list[str]) -> bytes:
    """The film for reading: up to :data:`VIEW_MAX_SIDE` px, true aspect ratio, 8-bit grey PNG."""
    key = ("view", sha256)
    cached = _cache.get(key)
    if cached is None:
        cached = _png(_bytes(film_grey(sha256, stored_paths)), "L", optimize=False)  # speed over bytes
        _cache.put(key, cached)
    return cached


class Explainer:
    """The serving model of a model folder, loaded once per process (LiteRT on CPU: no TensorFlow),
    for what the film page shows beside the film: the model's input, the heat map, the lung outline."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = model_dir
        self._scorer = None
        self._lock = threading.Lock()  # one inference at a time: LiteRT's interpreter is not re-entrant

    @property
    def scorer(self):
        if self._scorer is None:
            from pipeline.inference import Scorer

            self._scorer = Scorer.load(self.model_dir, features=True)
        return self._scorer

    def model_view(self, grey: np.ndarray) -> tuple[np.ndarray, tuple[float, float, float, float], object]:
        """(the model's input tensor, the crop box on the film, the lung fields or None)."""
        from pipeline.lungs import crop_box

        with self._lock:
            tensor, fields = self.scorer.model_input(grey)
        return tensor, (0.0, 0.0, 1.0, 1.0) if fields is None else crop_box(fields), fields

    def heat(self, grey: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """The class activation map on a film of ``shape``: (H, W) in [0, 1]."""
        with self._lock:
            return self.scorer.film_heatmap(grey, shape)

    def lung_probability(self, grey: np.ndarray) -> np.ndarray | None:
        """The lung model's probability map over the whole film, or None for a model without one."""
        lungs = self.scorer.model_input.lungs
        if lungs is None:
            return None
        with self._lock:
            return lungs.fields(grey)[1]


_explainers: dict[Path, Explainer] = {}


def explainer(model_dir: Path) -> Explainer:
    return _explainers.setdefault(Path(model_dir), Explainer(Path(model_dir)))


def _overlay_shape(grey: np.ndarray) -> tuple[int, int]:
    """The overlays' size: the film's aspect ratio at up to OVERLAY_SIDE px (the browser scales it)."""
    height, width = grey.shape
    scale = min(1.0, OVERLAY_SIDE / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def heatmap_png(sha256: str, stored_paths: list[str], model_dir: Path) -> bytes:
    """A transparent class-activation overlay of the film (same aspect ratio) to lay over it."""
    from pipeline.cam import heat_rgba

    key = ("cam", sha256, str(model_dir))
    cached = _cache.get(key)
    if cached is None:
        grey = film_grey(sha256, stored_paths)
        heat = explainer(model_dir).heat(grey, _overlay_shape(grey))
        cached = _png(heat_rgba(heat), "RGBA", optimize=False)
        _cache.put(key, cached)
    return cached


def lungs_png(sha256: str, stored_paths: list[str], model_dir: Path) -> bytes | None:
    """A transparent overlay with the outline of the lung fields, or None for a model without them."""
    from pipeline.cam import lung_outline

    key = ("lungs", sha256, str(model_dir))
    cached = _cache.get(key)
    if cached is None:
        grey = film_grey(sha256, stored_paths)
        probability = explainer(model_dir).lung_probability(grey)
        if probability is None:
            return None
        cached = _png(lung_outline(probability, _overlay_shape(grey)), "RGBA", optimize=False)
        _cache.put(key, cached)
    return cached


def model_input_png(sha256: str, stored_paths: list[str], model_dir: Path, size: int) -> bytes:
    """What the model saw: the film (or its lung crop) squashed to the model's square, as PNG."""
    from pipeline.lungs import crop_to_lungs

    key = ("input", sha256, str(model_dir), size)
    cached = _cache.get(key)
    if cached is None:
        grey = film_grey(sha256, stored_paths)
        _, box, _ = explainer(model_dir).model_view(grey)
        cached = _png(_bytes(resize_square(crop_to_lungs(grey, box), size)), "L")
        _cache.put(key, cached)
    return cached
