"""Load a model directory (``metadata.json`` + Keras model file) and score batches.

TensorFlow is imported only inside :meth:`Scorer.load`, so importing this module is cheap.
Inputs are the output of :func:`pipeline.normalise.to_model_input` stacked into
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

METADATA_FILE = "metadata.json"
DEFAULT_MODEL_FILE = "model.keras"


@dataclass(frozen=True)
class ModelScore:
    """Scores of one image."""

    pneumonia_probability: float  # calibrated sigmoid(logit / temperature)
    pneumonia_logit: float  # raw
    viral_probability: float | None  # P(viral | pneumonia), sigmoid of the viral head


def sigmoid(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probability ``sigmoid(logit / temperature)`` (numerically stable, any shape).

    The one place this formula lives: serving, training calibration, comparison and benchmarks
    all call it, so a stored score and an evaluated score cannot drift apart.
    """
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64) / temperature))


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

    @classmethod
    def load(cls, model_dir: str | Path) -> Scorer:
        """Load ``model_dir``; imports TensorFlow and sets GPU memory growth if a GPU is visible."""
        quiet = not logging.getLogger().isEnabledFor(logging.DEBUG)
        with _native_stderr_silenced(quiet):
            import tensorflow as tf

            _configure_devices(tf)
            model, metadata = load_keras_model(model_dir)
            size = int(metadata["input_size"])
            fn = tf.function(
                lambda x: model(x, training=False),
                input_signature=[tf.TensorSpec((None, size, size, 1), tf.float32)],
            )
            fn(np.zeros((1, size, size, 1), dtype=np.float32))  # warm-up: the first call prints banners too
        return cls(
            version=str(metadata["version"]),
            input_size=size,
            screening_threshold=float(metadata["screening_threshold"]),
            high_confidence_threshold=float(metadata["high_confidence_threshold"]),
            temperature=float(metadata["temperature"]),
            metadata=metadata,
            _model=model,
            _fn=fn,
        )

    def logits(self, tensors: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw (pneumonia, viral) logits for a ``(N, size, size, 1)`` batch."""
        x = np.asarray(tensors, dtype=np.float32)
        if x.ndim == 3:
            x = x[..., np.newaxis]
        expected = (self.input_size, self.input_size, 1)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(f"expected tensors of shape (N, {self.input_size}, {self.input_size}, 1)")
        out = self._fn(x)  # one graph for any batch size (the batch dimension is left free)
        pneumonia = np.asarray(out["pneumonia"], dtype=np.float64)[:, 0]
        viral = np.asarray(out["viral"], dtype=np.float64)[:, 0] if "viral" in out else None
        return pneumonia, viral

    def score_batch(self, tensors: np.ndarray) -> list[ModelScore]:
        """Scores for a ``(N, size, size, 1)`` float32 batch from ``to_model_input``."""
        if len(tensors) == 0:
            return []
        pneumonia, viral = self.logits(tensors)
        prob = sigmoid(pneumonia, self.temperature)
        viral_prob = sigmoid(viral) if viral is not None else None
        return [
            ModelScore(
                pneumonia_probability=float(prob[i]),
                pneumonia_logit=float(pneumonia[i]),
                viral_probability=None if viral_prob is None else float(viral_prob[i]),
            )
            for i in range(len(prob))
        ]

    def score_files(self, paths: Iterable[str | Path], batch_size: int = 32) -> list[ModelScore]:
        """Decode, preprocess and score files through the serving path (errors propagate)."""
        from pipeline.decode import decode_file
        from pipeline.normalise import to_model_input

        scores: list[ModelScore] = []
        batch: list[np.ndarray] = []
        for path in paths:
            batch.append(to_model_input(decode_file(path).pixels, self.input_size))
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


def logit_to_probability(logit: float, temperature: float) -> float:
    """Calibrated probability from one raw logit (see :func:`sigmoid`)."""
    return float(sigmoid(logit, temperature))
