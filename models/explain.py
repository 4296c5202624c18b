"""Grad-CAM heat maps of the ``pneumonia`` logit for one scored image.

The heat map is computed on the last convolutional feature map of at least 8x8 cells
(see :func:`_feature_layer`), upsampled to the grey image's size and scaled to [0, 1].
It shows where the model looked; it is not a lesion segmentation.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from models import default_model_dir
from pipeline.normalise import to_model_input


def _feature_layer(model: Any, min_side: int = 8) -> Any:
    """Last layer with a 4-D output of at least ``min_side`` pixels a side, before pooling.

    The very last feature map of these nets is 4x4 at 128 px input, too coarse to show
    anything; the last map of at least 8x8 keeps most of the semantics with a usable grid.
    """
    candidate = None
    for layer in model.layers:
        if layer.name in ("gap", "flatten"):
            break
        output = getattr(layer, "output", None)
        if output is None or len(output.shape) != 4:
            continue
        if candidate is None or output.shape[1] >= min_side:
            candidate = layer
    if candidate is None:
        raise ValueError("no convolutional feature map found for Grad-CAM")
    return candidate


@lru_cache(maxsize=4)
def _cam_models(model_dir: str) -> tuple[list[Any], int]:
    """Grad-CAM sub-models (feature map, pneumonia logit); one per member of an ensemble."""
    import keras

    from models.architectures import load_trained

    model, metadata = load_trained(model_dir)
    members = [layer for layer in model.layers if isinstance(layer, keras.Model)] or [model]
    cams = []
    for member in members:
        feature = _feature_layer(member)
        cams.append(keras.Model(member.inputs, [feature.output, member.get_layer("pneumonia").output]))
    return cams, int(metadata["input_size"])


def _one_cam(cam_model: Any, x: Any, shape: tuple[int, int]) -> np.ndarray:
    import tensorflow as tf
    from PIL import Image

    with tf.GradientTape() as tape:
        features, logit = cam_model(x, training=False)
        target = logit[:, 0]
    grads = tape.gradient(target, features)
    weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[0].numpy().astype(np.float32)
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    height, width = shape
    resized = Image.fromarray(cam, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def gradcam(model_dir: str | Path | None, grey: np.ndarray) -> np.ndarray:
    """Grad-CAM heat map (H, W) in [0, 1] of the pneumonia logit, at the grey image's size.

    For an ensemble the members' normalised maps are averaged.
    """
    import tensorflow as tf

    cam_models, size = _cam_models(str(Path(model_dir or default_model_dir()).resolve()))
    x = tf.constant(to_model_input(grey, size)[np.newaxis])
    cam = np.mean([_one_cam(m, x, grey.shape) for m in cam_models], axis=0)
    peak = float(cam.max())
    cam = cam / peak if peak > 0 else np.zeros_like(cam)
    return np.clip(cam, 0.0, 1.0).astype(np.float32)


def input_gradcam(model_dir: str | Path | None, x: np.ndarray) -> np.ndarray:
    """Grad-CAM over one model input (``(size, size, 1)``, as the model saw it), averaged over an
    ensemble's members, scaled to [0, 1]: for a model that reads a crop, the map of the crop."""
    import tensorflow as tf

    cam_models, size = _cam_models(str(Path(model_dir or default_model_dir()).resolve()))
    tensor = tf.constant(np.asarray(x, dtype=np.float32)[np.newaxis])
    cam = np.mean([_one_cam(m, tensor, (size, size)) for m in cam_models], axis=0)
    peak = float(cam.max())
    return np.clip(cam / peak if peak > 0 else cam, 0.0, 1.0).astype(np.float32)


def member_gradcam(model_dir: str | Path | None, grey: np.ndarray, member: int) -> np.ndarray:
    """Grad-CAM heat map of one member of an ensemble (index ``member``), scaled like :func:`gradcam`."""
    import tensorflow as tf

    cam_models, size = _cam_models(str(Path(model_dir or default_model_dir()).resolve()))
    x = tf.constant(to_model_input(grey, size)[np.newaxis])
    return np.clip(_one_cam(cam_models[member], x, grey.shape), 0.0, 1.0).astype(np.float32)


def overlay_rgb(grey: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The grey film (0..1) with the heat map blended on top (jet colour map), as uint8 RGB."""
    from PIL import Image

    from pipeline.colours import jet

    grey = np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0)
    if heatmap.shape != grey.shape:
        heatmap = np.asarray(
            Image.fromarray(heatmap.astype(np.float32), mode="F").resize(grey.shape[::-1]), dtype=np.float32
        )
    colour = jet(heatmap)
    weight = alpha * np.clip(heatmap, 0.0, 1.0)[..., None]
    blended = (1 - weight) * grey[..., None] + weight * colour
    return (np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8)


def write_overlay(grey: np.ndarray, heatmap: np.ndarray, out_png: str | Path, alpha: float = 0.4) -> None:
    """Write :func:`overlay_rgb` as a PNG."""
    from PIL import Image

    Image.fromarray(overlay_rgb(grey, heatmap, alpha), mode="RGB").save(out_png)
