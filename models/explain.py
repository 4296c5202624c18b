"""Grad-CAM heat maps of the ``pneumonia`` logit for one scored image.

The heat map is computed on the last convolutional feature map (the last 4-D layer before
global pooling or flattening), upsampled to the grey image's size and scaled to [0, 1].
It shows where the model looked; it is not a lesion segmentation.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from models import default_model_dir
from pipeline.normalise import to_model_input


def _feature_layer(model: Any) -> Any:
    """Last layer with a 4-D output that precedes the pooling/flatten layer."""
    candidate = None
    for layer in model.layers:
        if layer.name in ("gap", "flatten"):
            break
        shape = getattr(layer, "output", None)
        if shape is not None and len(layer.output.shape) == 4:
            candidate = layer
    if candidate is None:
        raise ValueError("no convolutional feature map found for Grad-CAM")
    return candidate


@lru_cache(maxsize=4)
def _cam_model(model_dir: str) -> tuple[Any, int]:
    import keras

    import models.architectures  # noqa: F401  registers custom layers

    metadata = json.loads((Path(model_dir) / "metadata.json").read_text())
    model_file = Path(model_dir) / metadata.get("model_file", "model.keras")
    model = keras.models.load_model(model_file, compile=False)
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if nested:  # an ensemble wrapper: explain its first member
        model = nested[0]
    feature = _feature_layer(model)
    cam = keras.Model(model.inputs, [feature.output, model.get_layer("pneumonia").output])
    return cam, int(metadata["input_size"])


def gradcam(model_dir: str | Path | None, grey: np.ndarray) -> np.ndarray:
    """Grad-CAM heat map (H, W) in [0, 1] of the pneumonia logit, at the grey image's size."""
    import tensorflow as tf
    from PIL import Image

    cam_model, size = _cam_model(str(Path(model_dir or default_model_dir()).resolve()))
    x = tf.constant(to_model_input(grey, size)[np.newaxis])
    with tf.GradientTape() as tape:
        features, logit = cam_model(x, training=False)
        target = logit[:, 0]
    grads = tape.gradient(target, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0].numpy().astype(np.float32)
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    height, width = grey.shape
    resized = Image.fromarray(cam, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def write_overlay(grey: np.ndarray, heatmap: np.ndarray, out_png: str | Path, alpha: float = 0.4) -> None:
    """Write the grey film with the heat map blended on top (jet colour map) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import Image

    grey = np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0)
    if heatmap.shape != grey.shape:
        heatmap = np.asarray(
            Image.fromarray(heatmap.astype(np.float32), mode="F").resize(grey.shape[::-1]), dtype=np.float32
        )
    colour = colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3]
    weight = alpha * np.clip(heatmap, 0.0, 1.0)[..., None]
    blended = (1 - weight) * grey[..., None] + weight * colour
    Image.fromarray((np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8), mode="RGB").save(out_png)
