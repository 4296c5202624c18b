"""Training-time augmentation and standardisation in TensorFlow.

Augmentation acts on resized grey levels in [0, 1] (the cached output of
:func:`pipeline.normalise.resize_square`); :func:`standardise_tf` then applies exactly the
per-image standardisation of :func:`pipeline.normalise.standardise`. With augmentation off,
``standardise_tf(grey)`` equals :func:`pipeline.normalise.to_model_input` (tested to 1e-4).

Random parameters are drawn with a seeded NumPy generator (:func:`draw_params`) and passed
in, so a run is reproducible regardless of TensorFlow's random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from pipeline.normalise import EPSILON

#: Resolution loss: the blurred copy is down-sampled by this factor and up-sampled back.
BLUR_FACTOR = 3


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random transforms."""

    rotation_deg: float = 8.0
    zoom: tuple[float, float] = (0.9, 1.15)  # >1 zooms in
    shift: float = 0.06  # fraction of the side
    gamma: tuple[float, float] = (0.7, 1.45)
    window_low: float = 0.08  # black point drawn from [0, window_low]
    window_high: float = 0.9  # white point drawn from [window_high, 1]
    noise_std: float = 0.02
    probability: float = 0.9  # chance that an image gets the geometric/intensity transforms
    fill_black_probability: float = 0.0  # chance that a batch fills uncovered borders with black
    #: Acquisition-shift and shortcut-cue transforms ("shift" preset); all off by default so
    #: the random-number stream of "standard" and "strong" is unchanged.
    marker_probability: float = 0.0  # burned-in side marker / text block near an edge or corner
    border_mask_probability: float = 0.0  # collimation-like black or white bands on random sides
    border_mask_max: float = 0.14  # widest band, fraction of the side
    blur_probability: float = 0.0  # resolution loss: mix with a down-up sampled copy
    curve_probability: float = 0.0  # sigmoid contrast curve (another site's processing LUT)


#: Wider field-of-view changes and black borders (collimation), for robustness to framing.
STRONG = AugmentConfig(
    rotation_deg=10.0, zoom=(0.8, 1.25), shift=0.08, gamma=(0.6, 1.6), fill_black_probability=0.5
)
#: "strong" plus what differs between sites and what a net can use as a shortcut: burned-in
#: side markers and text at random edges and corners (so they carry no label information),
#: collimation bands, resolution loss and contrast curves, and wider position shifts.
SHIFT = AugmentConfig(
    rotation_deg=10.0,
    zoom=(0.8, 1.25),
    shift=0.1,
    gamma=(0.6, 1.6),
    fill_black_probability=0.5,
    marker_probability=0.5,
    border_mask_probability=0.35,
    blur_probability=0.3,
    curve_probability=0.3,
)
#: "strong" plus the burned-in markers only: the shortcut cue the external check found (the "R"
#: side marker), without the acquisition-shift transforms of "shift", to tell which part of that
#: preset costs specificity.
MARKERS = replace(STRONG, marker_probability=0.5)
#: "strong" plus the collimation bands of "shift" only (black or white bands on one to four sides):
#: the part of "shift" that should make the border frame carry no label information.
BANDS = replace(STRONG, border_mask_probability=0.35)
PRESETS = {"standard": AugmentConfig(), "strong": STRONG, "shift": SHIFT, "markers": MARKERS, "bands": BANDS}


def draw_params(rng: np.random.Generator, n: int, size: int, cfg: AugmentConfig) -> dict:
    """Per-image random parameters for :func:`augment_tf` (float32 arrays, one bool)."""
    active = rng.random(n) < cfg.probability
    angle = np.deg2rad(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, n)) * active
    zoom = np.where(active, np.exp(rng.uniform(math.log(cfg.zoom[0]), math.log(cfg.zoom[1]), n)), 1.0)
    shift = rng.uniform(-cfg.shift, cfg.shift, (n, 2)) * size * active[:, None]
    gamma = np.where(active, np.exp(rng.uniform(math.log(cfg.gamma[0]), math.log(cfg.gamma[1]), n)), 1.0)
    low = rng.uniform(0.0, cfg.window_low, n) * active
    high = np.where(active, rng.uniform(cfg.window_high, 1.0, n), 1.0)
    noise = rng.uniform(0.0, cfg.noise_std, n) * active
    return {
        "transform": _affine(angle, zoom, shift, size).astype(np.float32),
        "gamma": gamma.astype(np.float32),
        "low": low.astype(np.float32),
        "high": high.astype(np.float32),
        "noise": noise.astype(np.float32),
        "noise_seed": rng.integers(0, 2**31 - 1, 2).astype(np.int32),
        # drawn only when enabled, so the "standard" stream of random numbers is unchanged
        "fill_black": bool(cfg.fill_black_probability > 0 and rng.random() < cfg.fill_black_probability),
    } | (_shift_params(rng, n, size, cfg) if _has_shift(cfg) else {})


def _has_shift(cfg: AugmentConfig) -> bool:
    shift = (cfg.marker_probability, cfg.border_mask_probability, cfg.blur_probability, cfg.curve_probability)
    return max(shift) > 0


def _shift_params(rng: np.random.Generator, n: int, size: int, cfg: AugmentConfig) -> dict:
    """Overlay (markers, collimation bands), blur mix weight and contrast curve per image.

    The overlay is built here in NumPy: ``alpha`` (N, H, W) says where it replaces the image,
    ``overlay`` (N, H, W) with what grey level.
    """
    overlay = np.zeros((n, size, size), np.float32)
    alpha = np.zeros((n, size, size), np.float32)
    for i in range(n):
        if rng.random() < cfg.border_mask_probability:
            _draw_bands(rng, overlay[i], alpha[i], cfg.border_mask_max)
        if rng.random() < cfg.marker_probability:
            for _ in range(rng.integers(1, 3)):
                _draw_marker(rng, overlay[i], alpha[i])
    blur = np.where(rng.random(n) < cfg.blur_probability, rng.uniform(0.5, 1.0, n), 0.0)
    curve = np.where(rng.random(n) < cfg.curve_probability, rng.uniform(0.3, 0.8, n), 0.0)
    return {
        "overlay": overlay,
        "alpha": alpha,
        "blur": blur.astype(np.float32),
        "curve": curve.astype(np.float32),
        "curve_slope": rng.uniform(4.0, 10.0, n).astype(np.float32),
        "curve_centre": rng.uniform(0.35, 0.65, n).astype(np.float32),
    }


def _draw_bands(rng: np.random.Generator, overlay: np.ndarray, alpha: np.ndarray, widest: float) -> None:
    """Collimation: one to four sides covered by a band, black or white (unexposed) film."""
    size = overlay.shape[0]
    level = 0.0 if rng.random() < 0.6 else rng.uniform(0.85, 1.0)
    sides = rng.permutation(4)[: rng.integers(1, 5)]
    for side in sides:
        width = max(1, int(rng.uniform(0.03, widest) * size))
        band = [np.s_[:width, :], np.s_[-width:, :], np.s_[:, :width], np.s_[:, -width:]][side]
        overlay[band] = level
        alpha[band] = 1.0


def _draw_marker(rng: np.random.Generator, overlay: np.ndarray, alpha: np.ndarray) -> None:
    """A burned-in side marker or text: a random 3x5 glyph (or a row of them) near an edge."""
    size = overlay.shape[0]
    cell = max(1, int(rng.uniform(0.012, 0.03) * size))
    glyphs = rng.integers(1, 4)
    glyph = rng.random((5, 3 * glyphs + glyphs - 1)) < 0.55
    glyph[:, 3::4] = False  # gaps between letters
    mark = np.kron(glyph, np.ones((cell, cell), bool))
    h, w = mark.shape
    if h >= size or w >= size:
        return
    # markers start within the outer 22 % of the film (a wide line of text by a side edge can
    # reach 26 %: at most 11 cells of 3 % each)
    band = int(0.22 * size)
    top = int(rng.integers(0, size - h + 1))
    left = int(rng.integers(0, size - w + 1))
    edge = rng.integers(0, 4)
    if edge == 0:
        top = int(rng.integers(0, max(0, band - h) + 1))
    elif edge == 1:
        top = int(rng.integers(min(size - band, size - h), size - h + 1))
    elif edge == 2:
        left = int(rng.integers(0, max(0, band - w) + 1))
    else:
        left = int(rng.integers(min(size - band, size - w), size - w + 1))
    level = rng.uniform(0.85, 1.0) if rng.random() < 0.8 else rng.uniform(0.0, 0.1)
    region = np.s_[top : top + h, left : left + w]
    if rng.random() < 0.5:  # a solid box behind the letters, as many markers have
        box_level = 1.0 - level if rng.random() < 0.5 else level * 0.5
        overlay[region] = np.where(mark, level, box_level)
        alpha[region] = 1.0
    else:
        overlay[region] = np.where(mark, level, overlay[region])
        alpha[region] = np.maximum(alpha[region], mark)


def _affine(angle: np.ndarray, zoom: np.ndarray, shift: np.ndarray, size: int) -> np.ndarray:
    """Projective transforms (output -> input coordinates) in TF's 8-parameter layout."""
    centre = (size - 1) / 2.0
    cos, sin = np.cos(angle) / zoom, np.sin(angle) / zoom
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = centre - a0 * centre - a1 * centre + shift[:, 0]
    b2 = centre - b0 * centre - b1 * centre + shift[:, 1]
    zeros = np.zeros_like(cos)
    return np.stack([a0, a1, a2, b0, b1, b2, zeros, zeros], axis=1)


def standardise_tf(grey):
    """Per-image standardisation of a (N, H, W) or (N, H, W, 1) batch -> (N, H, W, 1)."""
    import tensorflow as tf

    grey = tf.cast(grey, tf.float32)
    if grey.shape.rank == 3:
        grey = grey[..., tf.newaxis]
    mean = tf.reduce_mean(grey, axis=[1, 2, 3], keepdims=True)
    std = tf.math.reduce_std(grey, axis=[1, 2, 3], keepdims=True)
    out = (grey - mean) / (std + EPSILON)
    return tf.where(std > EPSILON, out, tf.zeros_like(out))


def augment_tf(grey, params: dict):
    """Augment a (N, H, W) batch of grey levels in [0, 1]; returns (N, H, W, 1) in [0, 1].

    ``params["fill_black"]`` is a Python bool (one graph per value inside a ``tf.function``).
    """
    import tensorflow as tf

    images = tf.cast(grey, tf.float32)[..., tf.newaxis]
    size = tf.shape(images)[1:3]
    images = tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=params["transform"],
        output_shape=size,
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="CONSTANT" if params.get("fill_black", False) else "NEAREST",
    )
    low = params["low"][:, None, None, None]
    high = params["high"][:, None, None, None]
    images = tf.clip_by_value((images - low) / (high - low), 0.0, 1.0)
    images = tf.pow(images + 1e-6, params["gamma"][:, None, None, None])
    if "overlay" in params:
        images = _acquisition_shift(images, params)
    noise = tf.random.stateless_normal(tf.shape(images), seed=params["noise_seed"])
    images = images + noise * params["noise"][:, None, None, None]
    images = tf.clip_by_value(images, 0.0, 1.0)
    if "overlay" in params:  # burned in last: markers and bands are not blurred or re-windowed
        alpha = tf.convert_to_tensor(params["alpha"])[..., tf.newaxis]
        images = images * (1.0 - alpha) + tf.convert_to_tensor(params["overlay"])[..., tf.newaxis] * alpha
    return images


def _acquisition_shift(images, params: dict):
    """Resolution loss (mix with a down-up sampled copy) and a sigmoid contrast curve."""
    import tensorflow as tf

    size = tf.shape(images)[1:3]
    factor = BLUR_FACTOR
    small = tf.image.resize(images, size // factor, method="area")
    blurred = tf.image.resize(small, size, method="bilinear")
    blur = params["blur"][:, None, None, None]
    images = images + blur * (blurred - images)
    k = params["curve_slope"][:, None, None, None]
    c = params["curve_centre"][:, None, None, None]
    lo, hi = tf.sigmoid(-k * c), tf.sigmoid(k * (1.0 - c))
    curved = (tf.sigmoid(k * (images - c)) - lo) / (hi - lo)
    mix = params["curve"][:, None, None, None]
    return images + mix * (curved - images)
