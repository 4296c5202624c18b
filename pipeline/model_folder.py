"""What a model folder holds (``metadata.json``, the Keras model, its LiteRT export) and which
engine serves it. Imports nothing heavy: settings and command lines read the engine's name from here.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
from enum import StrEnum
from pathlib import Path

from pipeline.extras import tensorflow_installed

METADATA_FILE = "metadata.json"
DEFAULT_MODEL_FILE = "model.keras"
#: The serving graph exported for LiteRT, and what it was exported from (``models.lite``).
LITE_MODEL_FILE = "model.tflite"
LITE_SIDECAR_FILE = "model.tflite.json"
#: Files whose content the exported graph depends on, besides the Keras model file itself.
LITE_SOURCES = ("ood.npz",)

log = logging.getLogger(__name__)


class Engine(StrEnum):
    """What runs the model: ``auto`` picks LiteRT on a CPU-only machine when the folder ships a
    current export, else TensorFlow."""

    AUTO = "auto"
    LITERT = "litert"
    TENSORFLOW = "tensorflow"


def check_model_dir(model_dir: Path) -> str | None:
    """Why ``model_dir`` cannot be a model (without loading TensorFlow), or None. The workers still
    load it for real before taking any message."""
    try:
        metadata = json.loads((model_dir / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        return f"{model_dir} has no readable {METADATA_FILE} ({type(exc).__name__})"
    model_file = model_dir / metadata.get("model_file", DEFAULT_MODEL_FILE)
    if not model_file.is_file():
        return f"{model_dir} has no model file {model_file.name}"
    return None


def model_version(model_dir: Path) -> str | None:
    """The ``version`` in ``model_dir``'s metadata (None when unreadable), without loading the model."""
    try:
        return str(json.loads((model_dir / METADATA_FILE).read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def lite_sources_digest(model_dir: str | Path) -> str:
    """SHA-256 over the files the LiteRT export is made from (the Keras model file and the guard)."""
    from pipeline.hashing import sha256_file

    model_dir = Path(model_dir)
    metadata = json.loads((model_dir / METADATA_FILE).read_text())
    names = [metadata.get("model_file", DEFAULT_MODEL_FILE), *LITE_SOURCES]
    parts = [f"{name}:{sha256_file(model_dir / name)}" for name in names if (model_dir / name).is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def lite_export(model_dir: Path) -> dict | None:
    """The sidecar of a current LiteRT export in ``model_dir``, or None (none, or made from other files)."""
    try:
        sidecar = json.loads((model_dir / LITE_SIDECAR_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not (model_dir / LITE_MODEL_FILE).is_file() or sidecar.get("sources_sha256") != lite_sources_digest(
        model_dir
    ):
        log.warning("the LiteRT export in the model folder is out of date: TensorFlow serves the model")
        return None
    return sidecar


def _gpu_present() -> bool:
    """An NVIDIA device node: a machine where TensorFlow (the ``gpu`` extra) should run the model."""
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def lite_serving(model_dir: str | Path, engine: Engine | str = Engine.AUTO) -> dict | None:
    """The sidecar of the LiteRT export that serves ``model_dir`` under ``engine``, or None when
    TensorFlow serves it; ``litert`` asked for and impossible is an error. ``auto`` picks TensorFlow
    on a machine with an NVIDIA GPU and TensorFlow installed, LiteRT otherwise (when exported)."""
    engine = Engine(engine)
    if engine is Engine.TENSORFLOW:
        return None
    sidecar = lite_export(Path(model_dir)) if _litert_installed() else None
    if engine is Engine.LITERT and sidecar is None:
        raise RuntimeError(
            "LiteRT cannot serve this model folder: export it with `cxr-triage model export-lite` "
            "(and install ai-edge-litert)"
        )
    if sidecar is None or engine is Engine.LITERT:
        return sidecar
    # auto: TensorFlow takes an NVIDIA GPU, where it is installed (the gpu extra); else LiteRT serves.
    return None if _gpu_present() and tensorflow_installed() else sidecar


def resolve_engine(model_dir: str | Path, engine: Engine | str = Engine.AUTO) -> Engine:
    """The engine that will serve ``model_dir`` (see :func:`lite_serving`)."""
    return Engine.TENSORFLOW if lite_serving(model_dir, engine) is None else Engine.LITERT


def _litert_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("ai_edge_litert") is not None
