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
from dataclasses import dataclass

import numpy as np

from pipeline.normalise import EPSILON


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


#: Wider field-of-view changes and black borders (collimation), for robustness to framing.
STRONG = AugmentConfig(
    rotation_deg=10.0, zoom=(0.8, 1.25), shift=0.08, gamma=(0.6, 1.6), fill_black_probability=0.5
)
PRESETS = {"standard": AugmentConfig(), "strong": STRONG}


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
    }


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
    noise = tf.random.stateless_normal(tf.shape(images), seed=params["noise_seed"])
    images = images + noise * params["noise"][:, None, None, None]
    return tf.clip_by_value(images, 0.0, 1.0)
