"""Load a model directory (``metadata.json`` + Keras model file) and score batches.

Two engines run the same serving graph (the ensemble, its features and the OOD guard):
LiteRT (``model.tflite``, exported from the Keras model by :mod:`models.lite`) on CPU-only
machines, which never imports TensorFlow, and TensorFlow (the Keras model) on GPU machines, for
model folders without a current export, and wherever the Keras model itself is needed.
TensorFlow is imported only inside :meth:`Scorer.load`, so importing this module is cheap.
Inputs are the model's input (:attr:`Scorer.model_input`: the whole film or its lung crop) stacked into
``(N, size, size, 1)`` float32 arrays.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.extras import require_tensorflow
from pipeline.lungs import InputPlan, LungFields, ModelInput
from pipeline.model_folder import (  # noqa: F401 - the folder's layout, re-exported for its callers
    DEFAULT_MODEL_FILE,
    LITE_MODEL_FILE,
    LITE_SIDECAR_FILE,
    METADATA_FILE,
    Engine,
    lite_serving,
    lite_sources_digest,
    resolve_engine,
)
from pipeline.probability import sigmoid


class _LiteRunner:
    """The exported serving graph run by LiteRT's interpreter (XNNPACK, CPU): called like the
    TensorFlow function, with a batch, it returns the same named outputs."""

    def __init__(self, model_dir: Path, sidecar: dict, threads: int | None = None) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(
            model_path=str(model_dir / LITE_MODEL_FILE), num_threads=threads or os.cpu_count() or 1
        )
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._outputs = {
            detail["index"]: sidecar["outputs"][detail["name"]]
            for detail in self._interpreter.get_output_details()
        }
        self._batch: int | None = None

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if x.shape[0] != self._batch:  # cheap: the weights are constants, only buffers are resized
            self._interpreter.resize_tensor_input(self._input, x.shape)
            self._interpreter.allocate_tensors()
            self._batch = x.shape[0]
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(x, dtype=np.float32))
        self._interpreter.invoke()
        return {name: self._interpreter.get_tensor(index).copy() for index, name in self._outputs.items()}


@dataclass(frozen=True)
class ModelScore:
    """Scores of one image."""

    pneumonia_probability: float  # calibrated sigmoid(logit / temperature)
    pneumonia_logit: float  # raw
    viral_probability: float | None  # P(viral | pneumonia), sigmoid of the viral head
    # Out-of-distribution guard (pipeline.ood), when the model ships one:
    ood_distance: float | None = None  # Mahalanobis distance of the penultimate features
    out_of_distribution: bool = False  # beyond the guard's cut-off, or turned: reject, do not rank
    orientation_logit: float | None = None  # the guard's "film looks turned or inverted" logit
    ood_reason: str | None = None  # why it is rejected (pipeline.ood.REASON / ORIENTATION_REASON)


@contextlib.contextmanager
def _native_stderr_silenced(enabled: bool):
    """TensorFlow's C++ start-up banners (absl, oneDNN) ignore TF_CPP_MIN_LOG_LEVEL: hide them.

    Only file descriptor 2 is redirected, and only around import, load and warm-up; Python
    exceptions still propagate and are reported once stderr is back.
    """
    if not enabled:
        yield
        return
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _inference_layers(keras: Any) -> dict:
    """Stand-ins for training-only layers, so that serving needs no training code.

    ``cxr>GradientScale`` (models.architectures) scales gradients flowing from the viral head
    into the shared trunk; its forward pass is the identity, which is all inference needs.
    """

    class GradientScale(keras.layers.Layer):
        def __init__(self, scale: float = 1.0, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.scale = float(scale)

        def call(self, inputs: Any) -> Any:
            return inputs

        def get_config(self) -> dict:
            return {**super().get_config(), "scale": self.scale}

    return {"cxr>GradientScale": GradientScale, "GradientScale": GradientScale}


def _configure_devices(tf: Any) -> None:
    """Let TensorFlow grow GPU memory instead of grabbing all of it."""
    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError):  # already initialised: nothing to do
            tf.config.experimental.set_memory_growth(gpu, True)


def load_keras_model(model_dir: str | Path, custom_objects: dict | None = None) -> tuple[Any, dict]:
    """(Keras model, metadata) of a model folder: the one way every caller loads a model.

    The model file is ``metadata["model_file"]`` (default ``model.keras``). Serving passes no
    ``custom_objects`` and gets the inference stand-ins of the training-only layers; training
    tools pass ``{}`` after importing ``models.architectures``, whose registered layers then apply.
    """
    require_tensorflow()
    import keras

    model_dir = Path(model_dir)
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    model = keras.models.load_model(
        model_dir / metadata.get("model_file", DEFAULT_MODEL_FILE),
        compile=False,
        custom_objects=_inference_layers(keras) if custom_objects is None else custom_objects,
    )
    return model, metadata


@dataclass
class Scorer:
    """A loaded model with its calibration and operating thresholds."""

    version: str
    input_size: int
    screening_threshold: float
    high_confidence_threshold: float
    temperature: float
    metadata: dict = field(repr=False, default_factory=dict)
    _model: Any = field(repr=False, default=None)
    _fn: Any = field(repr=False, default=None)
    #: Out-of-distribution guard (``pipeline.ood``) shipped beside the model, or None.
    ood: Any = field(repr=False, default=None)
    #: What runs the model (:class:`Engine`); ``_model`` (the Keras model) is None under LiteRT.
    engine: Engine = Engine.TENSORFLOW
    #: The model folder (its lung model, when the classifier reads the lung crop).
    model_dir: Path | None = None

    @classmethod
    def load(
        cls, model_dir: str | Path, features: bool | None = None, engine: Engine | str = Engine.AUTO
    ) -> Scorer:
        """Load ``model_dir`` with ``engine`` (:func:`resolve_engine`). TensorFlow is imported only for
        the TensorFlow engine, which also sets GPU memory growth if a GPU is visible.

        ``features``: also compute the penultimate features (for the OOD guard); default: when
        the model folder ships a guard (``ood.npz``). The LiteRT export always computes them.
        """
        from pipeline.ood import OodGuard

        model_dir = Path(model_dir)
        metadata = json.loads((model_dir / METADATA_FILE).read_text())
        guard = OodGuard.for_model_dir(model_dir)
        sidecar = lite_serving(model_dir, engine) if features is not False else None
        if features and sidecar is not None and "features" not in sidecar.get("outputs", {}).values():
            sidecar = None  # an export made before the folder had a guard: TensorFlow computes the features
        quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)
        if sidecar is not None:
            with _native_stderr_silenced(quiet):  # LiteRT's "Created ... XNNPACK delegate" banner
                runner = _LiteRunner(model_dir, sidecar)
                size = int(metadata["input_size"])
                runner(np.zeros((1, size, size, 1), dtype=np.float32))  # warm-up: the banner comes here
            return cls._from_metadata(metadata, runner, guard, Engine.LITERT, model_dir)
        require_tensorflow()  # no current LiteRT export, or TensorFlow asked for: say which extra
        with _native_stderr_silenced(quiet):
            import tensorflow as tf

            _configure_devices(tf)
            model, metadata = load_keras_model(model_dir)
            served = model
            if features or (features is None and guard is not None):
                from pipeline.ood import feature_model

                served = feature_model(model)  # same logits, plus the penultimate features
            size = int(metadata["input_size"])
            fn = tf.function(
                lambda x: _serve(served, guard, x),
                input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)],
            )
            fn(np.zeros((1, size, size, 1), dtype=np.float32))  # warm-up: the first call prints banners too
        scorer = cls._from_metadata(metadata, fn, guard, Engine.TENSORFLOW, model_dir)
        scorer._model = model
        return scorer

    @classmethod
    def _from_metadata(
        cls, metadata: dict, fn: Any, guard: Any, engine: Engine, model_dir: Path | None = None
    ) -> Scorer:
        return cls(
            version=str(metadata["version"]),
            input_size=int(metadata["input_size"]),
            screening_threshold=float(metadata["screening_threshold"]),
            high_confidence_threshold=float(metadata["high_confidence_threshold"]),
            temperature=float(metadata["temperature"]),
            metadata=metadata,
            _fn=fn,
            ood=guard,
            engine=engine,
            model_dir=model_dir,
        )

    def _outputs(self, tensors: np.ndarray) -> dict:
        x = np.asarray(tensors, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., np.newaxis]
        expected = (self.input_size, self.input_size, 1)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"expected tensors of shape (N, {self.input_size}, {self.input_size}, 1)")
        return self._fn(x)  # one graph for any batch size (the batch dimension is left free)

    def logits(self, tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw (pneumonia, viral) logits for a ``(N, size, size, 1)`` batch."""
        out = self._outputs(tensors)
        pneumonia = np.asarray(out["pneumonia"], dtype=np.float64)[:, 0]
        viral = np.asarray(out["viral"], dtype=np.float64)[:, 0] if "viral" in out else None
        return pneumonia, viral

    def features(self, tensors: np.ndarray) -> np.ndarray:
        """Penultimate features ``(N, dims)`` (needs a Scorer loaded with ``features=True``)."""
        out = self._outputs(tensors)
        if "features" not in out:
            raise ValueError("this Scorer was loaded without features")
        return np.asarray(out["features"], dtype=np.float64)

    def cam(self, tensors: np.ndarray) -> np.ndarray:
        """Class activation maps ``(N, h, w)`` in [0, 1] of the pneumonia logit over the model's input
        (:mod:`pipeline.cam`), from the same serving graph as the scores, under either engine."""
        out = self._outputs(tensors)
        if "cam" not in out:
            raise ValueError(
                "this model's serving graph has no class activation maps "
                "(load it with features, or re-export it: cxr-triage model export-lite)"
            )
        return np.asarray(out["cam"], dtype=np.float32)

    def film_heatmap(self, grey: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """The class activation map of one film on the film: its input (whole film or lung crop)
        explained and put back where it came from, (H, W) in [0, 1] at ``shape`` (default: the film's)."""
        from pipeline.cam import place_on_film
        from pipeline.lungs import crop_box

        tensor, fields = self.model_input(grey)
        box = (0.0, 0.0, 1.0, 1.0) if fields is None else crop_box(fields)
        return place_on_film(self.cam(tensor[np.newaxis])[0], box, shape or grey.shape)

    def score_batch(self, tensors: np.ndarray) -> list[ModelScore]:
        """Scores for a ``(N, size, size, 1)`` float32 batch of :attr:`model_input` tensors."""
        if len(tensors) == 0:
            return []
        out = self._outputs(tensors)
        pneumonia = np.asarray(out["pneumonia"], dtype=np.float64)[:, 0]
        viral = np.asarray(out["viral"], dtype=np.float64)[:, 0] if "viral" in out else None
        prob = sigmoid(pneumonia, self.temperature)
        viral_prob = sigmoid(viral) if viral is not None else None
        distance = np.asarray(out["ood_distance"], dtype=np.float64) if "ood_distance" in out else None
        turned = (
            np.asarray(out["orientation_logit"], dtype=np.float64) if "orientation_logit" in out else None
        )
        reasons = [
            None if distance is None else self.ood.reason(distance[i], None if turned is None else turned[i])
            for i in range(len(prob))
        ]
        return [
            ModelScore(
                pneumonia_probability=float(prob[i]),
                pneumonia_logit=float(pneumonia[i]),
                viral_probability=None if viral_prob is None else float(viral_prob[i]),
                ood_distance=None if distance is None else float(distance[i]),
                out_of_distribution=reasons[i] is not None,
                orientation_logit=None if turned is None else float(turned[i]),
                ood_reason=reasons[i],
            )
            for i in range(len(prob))
        ]

    @property
    def input_plan(self) -> InputPlan:
        """How this model's input is made (:class:`pipeline.lungs.InputPlan`)."""
        return InputPlan.from_metadata(self.model_dir or ".", self.metadata)

    @property
    def model_input(self) -> ModelInput:
        """What turns decoded grey levels into this model's input (:class:`pipeline.lungs.ModelInput`)."""
        return self.input_plan.maker()

    def input_check(self, score: ModelScore, fields: LungFields | None) -> str | None:
        """Why the input checks turn a scored film away (not a chest film, turned, no lung fields),
        or None when it is read. The lung fields come first: they say most plainly what is wrong."""
        if fields is not None and fields.problem():
            return fields.problem()
        return score.ood_reason if score.out_of_distribution else None

    def score_files(self, paths: Iterable[str | Path], batch_size: int = 32) -> list[ModelScore]:
        """Decode, preprocess and score files through the serving path (errors propagate)."""
        from pipeline.decode import decode_file

        scores: list[ModelScore] = []
        batch: list[np.ndarray] = []
        for path in paths:
            batch.append(self.model_input(decode_file(path).pixels)[0])
            if len(batch) == batch_size:
                scores.extend(self.score_batch(np.stack(batch)))
                batch = []
        if batch:
            scores.extend(self.score_batch(np.stack(batch)))
        return scores

    def category(self, probability: float) -> str:
        """``high_confidence``, ``screen_positive`` or ``negative`` for a calibrated probability."""
        if probability >= self.high_confidence_threshold:
            return "high_confidence"
        if probability >= self.screening_threshold:
            return "screen_positive"
        return "negative"


def _serve(model: Any, guard: Any, x: Any) -> Any:
    """Model outputs, plus the OOD guard's distance computed in the same graph when there is one."""
    out = model(x, training=False)
    if guard is not None and "features" in out:
        out = {**out, "ood_distance": guard.graph_distances(out["features"])}
        if guard.orientation is not None:
            out["orientation_logit"] = guard.orientation.graph_logits(out["features"])
    return out
