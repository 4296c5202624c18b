"""Class activation maps (CAM) of the pneumonia logit, computed inside the serving graph.

For a member that global-average-pools its last feature map ``F`` (h, w, c) into the ``pneumonia``
dense layer (kernel ``k``), the logit is ``mean_hw(F) . k + b``: the map ``F . k`` (h, w) says how
much each cell adds to it, with no gradients (Zhou et al. 2016). Members that flatten their map
instead (the ``baseline`` member of the shipped ensemble) have no such map and are left out of
the average. Each member's map is cut at zero and scaled to a peak of 1, the members' maps are
averaged and scaled to [0, 1] again, so that the serving engine (LiteRT or TensorFlow) returns a
``cam`` output of shape (N, h, w) with the scores, and explaining a film costs one inference.

The map covers the model's input: the whole film for a model that reads the whole film, the lung
crop for one that reads the crop (:func:`place_on_film` puts it back on the film with the crop box).
Colours come from :data:`COLOURS`, a 256 x 3 table (jet, from :mod:`pipeline.colours`; no
matplotlib). A research visualisation of where the score came from, not a lesion segmentation and
not a diagnosis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CAM_OUTPUT = "cam"
LABEL = "research visualisation, not a diagnosis"
#: Smallest peak a map is scaled by: a map that is all but zero stays near zero instead of
#: blowing float round-off up to full heat.
_MIN_PEAK = 1e-3


def member_cam(member: Any, grid: Any) -> Any | None:
    """The CAM (N, h, w) of one member from its last feature map ``grid`` (a Keras tensor), or None
    where the member does not global-average-pool that map into its ``pneumonia`` head."""
    from keras import layers, ops

    if not any(isinstance(layer, layers.GlobalAveragePooling2D) for layer in member.layers):
        return None
    kernel = member.get_layer("pneumonia").kernel  # (c, 1)
    if kernel.shape[0] != grid.shape[-1]:
        return None  # something sits between the pooled map and the head: not a plain CAM

    def cam(g: Any) -> Any:
        weighted = ops.relu(ops.einsum("bhwc,c->bhw", g, ops.convert_to_tensor(kernel)[:, 0]))
        return weighted / ops.maximum(ops.max(weighted, axis=(1, 2), keepdims=True), _MIN_PEAK)

    return layers.Lambda(cam, name=f"cam_{member.name}")(grid)


def ensemble_cam(maps: list[Any]) -> Any:
    """Average of the members' maps (resized to the finest grid), scaled to [0, 1]."""
    from keras import layers, ops

    side = max(m.shape[1] for m in maps)

    def combine(*tensors: Any) -> Any:
        resized = [
            t if t.shape[1] == side else ops.image.resize(t[..., None], (side, side))[..., 0] for t in tensors
        ]
        mean = ops.mean(ops.stack(resized, axis=0), axis=0)
        return mean / ops.maximum(ops.max(mean, axis=(1, 2), keepdims=True), _MIN_PEAK)

    return layers.Lambda(lambda ts: combine(*ts), name=CAM_OUTPUT)(maps)


def _colours() -> np.ndarray:
    """:func:`pipeline.colours.jet_table` (matplotlib's jet, without matplotlib) as 256 x 3 uint8."""
    from pipeline.colours import jet_table

    return (jet_table() * 255).round().astype(np.uint8)


#: The heat map's colours: row ``i`` is the colour of heat ``i / 255`` (dark blue to dark red).
COLOURS = _colours()


def place_on_film(
    cam: np.ndarray, box: tuple[float, float, float, float], shape: tuple[int, int]
) -> np.ndarray:
    """The (h, w) map of the model's input laid on a film of ``shape`` (H, W): bilinearly resized into
    the normalised crop ``box`` (top, left, bottom, right; the whole film for a model without a
    crop), zero outside it."""
    from PIL import Image

    height, width = shape
    top, left, bottom, right = box
    y0, x0 = int(np.floor(top * height)), int(np.floor(left * width))
    y1, x1 = max(int(np.ceil(bottom * height)), y0 + 1), max(int(np.ceil(right * width)), x0 + 1)
    inside = Image.fromarray(np.asarray(cam, dtype=np.float32), mode="F").resize(
        (x1 - x0, y1 - y0), Image.Resampling.BILINEAR
    )
    out = np.zeros((height, width), dtype=np.float32)
    out[y0:y1, x0:x1] = np.clip(np.asarray(inside), 0.0, 1.0)
    return out


def heat_rgba(heat: np.ndarray, opacity: float = 0.55) -> np.ndarray:
    """A transparent overlay (H, W, 4) uint8: the heat's colour, opacity rising with the heat."""
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    rgba = np.empty((*heat.shape, 4), dtype=np.uint8)
    rgba[..., :3] = COLOURS[(heat * 255).astype(np.uint8)]
    rgba[..., 3] = (opacity * 255 * np.sqrt(heat)).astype(np.uint8)
    return rgba


def blend_rgb(grey: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """The grey film (0..1) with the heat blended on top, weighted by the heat, as uint8 RGB."""
    grey = np.clip(np.asarray(grey, dtype=np.float32), 0.0, 1.0)
    heat = np.clip(np.asarray(heat, dtype=np.float32), 0.0, 1.0)
    colour = COLOURS[(heat * 255).astype(np.uint8)].astype(np.float32) / 255
    weight = alpha * heat[..., None]
    blended = (1 - weight) * grey[..., None] + weight * colour
    return (np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8)


def colour_scale(width: int = 256, height: int = 12) -> np.ndarray:
    """The colour scale as an RGB strip (low heat left, high heat right), for a legend."""
    index = np.linspace(0, 255, width).astype(np.uint8)
    return np.repeat(COLOURS[index][np.newaxis], height, axis=0)


def lung_outline(probability: np.ndarray, shape: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """A transparent RGBA overlay (H, W, 4) with the edge of the lung fields (probability >= threshold,
    the lung model's map over the whole film) drawn in a thin cyan line."""
    from PIL import Image

    height, width = shape
    resized = np.asarray(
        Image.fromarray(np.asarray(probability, dtype=np.float32), mode="F").resize(
            (width, height), Image.Resampling.BILINEAR
        )
    )
    inside = resized >= threshold
    edge = np.zeros_like(inside)
    thickness = max(1, round(max(height, width) / 400))
    for step in range(1, thickness + 1):
        edge[step:] |= inside[step:] != inside[:-step]
        edge[:, step:] |= inside[:, step:] != inside[:, :-step]
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[edge] = (0, 230, 255, 255)
    return rgba
