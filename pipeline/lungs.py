"""Lung fields: where the lungs are on a film, and the crop the pneumonia model reads.

The lung model (a small U-Net, trained by :mod:`models.lung_seg`) sees the film squashed to a
``LUNG_INPUT_SIZE`` square, standardised like the classifier's input, and returns the probability
that each pixel is lung. :func:`lung_fields` turns that map into what the pipeline needs: the
lung box (normalised to the film, so it applies to the film at any resolution), the lung area,
and whether two lung fields are present (a frontal chest film has one either side of the
midline). :func:`crop_to_lungs` cuts the decoded film to the box with a margin, so that the
classifier reads the lungs and not the film's edges (markers, arms, collimation, corners).

Pure functions and one small LiteRT runner; nothing here imports TensorFlow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.normalise import resize_square, standardise, to_model_input

LUNG_INPUT_SIZE = 128
LUNG_KERAS_FILE = "lungs.keras"
LUNG_LITE_FILE = "lungs.tflite"
LUNG_METADATA_FILE = "lungs.json"
#: A pixel is lung where the model's probability reaches this.
LUNG_PROBABILITY = 0.5
#: Each side of the midline needs this share of the film as lung to count as a lung field.
MIN_FIELD_SHARE = 0.015
#: Rows and columns with fewer lung pixels than this are specks, not lung (at LUNG_INPUT_SIZE).
MIN_LINE_PIXELS = 2
#: Margin added to each side of the lung box, as a share of the box's side.
CROP_MARGIN = 0.08
#: Models that also suppress what lies outside the lungs widen the lung mask by this many pixels of
#: the lung map (3 % of the film's side) first, so that the lung edges and costophrenic angles,
#: which a tight mask can miss, stay in view.
SUPPRESS_DILATION_PIXELS = 4
#: Plausible lung share of a frontal chest film (children's films: 0.25-0.45, adults': 0.19-0.56 for
#: 1-99 % of the films; far outside it, whatever the model found is not a pair of lungs).
LUNG_AREA_RANGE = (0.08, 0.75)
#: Where the centre of the lungs may lie (row, column ranges, normalised to the film).
CENTROID_RANGE = ((0.25, 0.75), (0.3, 0.7))


@dataclass(frozen=True)
class LungFields:
    """What the lung map says about one film (coordinates normalised to [0, 1] of the film)."""

    #: (top, left, bottom, right) of the lungs, without margin; None where no lung was found.
    box: tuple[float, float, float, float] | None
    #: Share of the film that is lung.
    area: float
    #: Lung share left and right of the film's midline (image left, image right).
    sides: tuple[float, float]
    #: Centre of the lung pixels (row, column); None where no lung was found.
    centroid: tuple[float, float] | None

    @property
    def two_fields(self) -> bool:
        """One lung field either side of the midline, as on any frontal chest film."""
        return min(self.sides) >= MIN_FIELD_SHARE

    def problem(self) -> str | None:
        """Why this film cannot be read as a frontal chest radiograph, or None when it can: no lung
        field either side of the midline, or "lungs" of an implausible size or place."""
        if not self.two_fields or self.centroid is None:
            return NO_LUNG_FIELDS
        low, high = LUNG_AREA_RANGE
        (top, bottom), (left, right) = CENTROID_RANGE
        row, col = self.centroid
        if not (low <= self.area <= high and top <= row <= bottom and left <= col <= right):
            return NO_LUNG_FIELDS
        return None


#: The input check's reason for a film without two lung fields.
NO_LUNG_FIELDS = "no lung fields found: not a frontal chest radiograph"


def lung_fields(probability: np.ndarray) -> LungFields:
    """Geometry of the lungs from a (H, W) probability map."""
    lung = probability >= LUNG_PROBABILITY
    height, width = lung.shape
    rows = np.flatnonzero(lung.sum(axis=1) >= MIN_LINE_PIXELS)
    cols = np.flatnonzero(lung.sum(axis=0) >= MIN_LINE_PIXELS)
    half = width // 2
    sides = (float(lung[:, :half].sum()) / lung.size, float(lung[:, half:].sum()) / lung.size)
    if rows.size == 0 or cols.size == 0:
        return LungFields(None, float(lung.mean()), sides, None)
    box = (rows[0] / height, cols[0] / width, (rows[-1] + 1) / height, (cols[-1] + 1) / width)
    ys, xs = np.nonzero(lung)
    centroid = (float(ys.mean() + 0.5) / height, float(xs.mean() + 0.5) / width)
    return LungFields(tuple(float(v) for v in box), float(lung.mean()), sides, centroid)


def crop_box(fields: LungFields, margin: float = CROP_MARGIN) -> tuple[float, float, float, float]:
    """The box the classifier reads: the lung box plus ``margin`` of its side each way, kept on the
    film; the whole film where no lung box was found (the input checks then say why)."""
    if fields.box is None:
        return (0.0, 0.0, 1.0, 1.0)
    top, left, bottom, right = fields.box
    dy, dx = (bottom - top) * margin, (right - left) * margin
    return (max(0.0, top - dy), max(0.0, left - dx), min(1.0, bottom + dy), min(1.0, right + dx))


def crop_to_lungs(grey: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """The part of a (H, W) film inside a normalised box (at least 8 pixels a side)."""
    height, width = grey.shape
    top, left, bottom, right = box
    y0, x0 = int(np.floor(top * height)), int(np.floor(left * width))
    y1 = max(int(np.ceil(bottom * height)), min(height, y0 + 8))
    x1 = max(int(np.ceil(right * width)), min(width, x0 + 8))
    return grey[y0:y1, x0:x1]


def lung_input(grey: np.ndarray, size: int = LUNG_INPUT_SIZE) -> np.ndarray:
    """The lung model's input, (size, size, 1) float32, from grey levels in [0, 1]."""
    return standardise(resize_square(grey, size))[..., np.newaxis]


class LungModel:
    """The exported lung model (``lungs.tflite``) run by LiteRT on CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self.path = Path(path)
        self._interpreter = Interpreter(model_path=str(self.path), num_threads=threads or os.cpu_count() or 1)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch: int | None = None

    def probability(self, inputs: np.ndarray) -> np.ndarray:
        """(N, S, S) lung probability for a (N, S, S, 1) batch of :func:`lung_input` arrays."""
        if inputs.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input, inputs.shape)
            self._interpreter.allocate_tensors()
            self._batch = inputs.shape[0]
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(inputs, dtype=np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[..., 0].copy()

    def fields(self, grey: np.ndarray) -> tuple[LungFields, np.ndarray]:
        """(geometry, probability map) of one film's grey levels in [0, 1]."""
        probability = self.probability(lung_input(grey)[np.newaxis])[0]
        return lung_fields(probability), probability


def suppress_outside_lungs(
    grey: np.ndarray, probability: np.ndarray, dilation: int = SUPPRESS_DILATION_PIXELS
) -> np.ndarray:
    """The film with what lies outside its widened lung fields replaced by the lungs' median grey
    (a soft edge, from the lung map scaled to the film); the film unchanged where no lung was found.

    ``probability`` is the lung model's map; the mask is widened by ``dilation`` map pixels."""
    from PIL import Image, ImageFilter

    lung = probability >= LUNG_PROBABILITY
    if not lung.any():
        return grey
    mask = Image.fromarray(lung.astype(np.uint8) * 255)
    if dilation > 0:
        mask = mask.filter(ImageFilter.MaxFilter(2 * dilation + 1))
    height, width = grey.shape
    weight = np.asarray(mask.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    inside = grey[weight >= 0.5]
    fill = np.float32(np.median(inside)) if inside.size else np.float32(grey.mean())
    return (grey * weight + fill * (1.0 - weight)).astype(grey.dtype, copy=False)


def lung_crop(grey: np.ndarray, lungs: LungModel, suppress: bool = False) -> tuple[np.ndarray, LungFields]:
    """(the film cut to its lung box with a margin, the lung geometry) for grey levels in [0, 1];
    with ``suppress``, what lies outside the lung fields is first set to the lungs' median grey."""
    fields, probability = lungs.fields(grey)
    if suppress:
        grey = suppress_outside_lungs(grey, probability)
    return crop_to_lungs(grey, crop_box(fields)), fields


def lung_model_input(
    grey: np.ndarray, size: int, lungs: LungModel, suppress: bool = False
) -> tuple[np.ndarray, LungFields]:
    """The classifier's input read from the lungs only: (size, size, 1) float32, and the geometry."""
    crop, fields = lung_crop(grey, lungs, suppress)
    return to_model_input(crop, size), fields


class ModelInput:
    """Turns a film's grey levels into the classifier's input, as its model folder says: the whole
    film squashed to a square, or (metadata ``crop.kind == "lungs"``) the film cut to its lung box
    by the lung model shipped in the folder, what lies outside the lungs suppressed where
    ``crop.suppress`` says so. Also returns the lung geometry where there is one."""

    def __init__(self, size: int, lungs: LungModel | None = None, suppress: bool = False) -> None:
        self.size = size
        self.lungs = lungs
        self.suppress = suppress

    def __call__(self, grey: np.ndarray) -> tuple[np.ndarray, LungFields | None]:
        if self.lungs is None:
            return to_model_input(grey, self.size), None
        return lung_model_input(grey, self.size, self.lungs, self.suppress)


@dataclass(frozen=True)
class InputPlan:
    """How a decode process makes a model's input (picklable, comparable): the input size, and the
    lung model (``lungs.tflite``) that cuts the film to its lung box, or None for the whole film,
    and whether what lies outside the lung fields is suppressed too."""

    size: int
    lung_model: str | None = None
    suppress: bool = False

    @classmethod
    def of(cls, plan: InputPlan | int) -> InputPlan:
        """A plan from a plan, or from a bare input size (the whole film at that size)."""
        return plan if isinstance(plan, InputPlan) else cls(int(plan))

    @classmethod
    def from_metadata(cls, model_dir: str | Path, metadata: dict) -> InputPlan:
        """The plan of a model folder (its ``metadata.json`` already read)."""
        crop = metadata.get("crop") or {}
        if crop.get("kind") != "lungs":
            return cls(int(metadata["input_size"]))
        lungs = str(Path(model_dir) / crop.get("lung_model", LUNG_LITE_FILE))
        return cls(int(metadata["input_size"]), lungs, bool(crop.get("suppress", False)))

    @property
    def decode_side(self) -> int:
        """Smallest side a reduced decode may give: a lung crop keeps about half of each side of the
        film, so the film is decoded at twice the input size to keep the crop sharp."""
        return self.size if self.lung_model is None else 2 * self.size

    def maker(self) -> ModelInput:
        """This process's :class:`ModelInput` for the plan (made once, then reused)."""
        return _maker(self)


@lru_cache(maxsize=4)
def _maker(plan: InputPlan) -> ModelInput:
    # one LiteRT thread: the decode processes themselves are the parallelism
    lungs = LungModel(plan.lung_model, threads=1) if plan.lung_model else None
    return ModelInput(plan.size, lungs, plan.suppress)
