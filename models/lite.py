"""Export the serving graph of a model folder for LiteRT (``model.tflite``): the same computation as
:meth:`pipeline.inference.Scorer.load` builds with TensorFlow (the Keras ensemble, its penultimate
features, the OOD guard's distance and orientation logit), frozen into one flatbuffer.

Why: a CPU process that scores with LiteRT does not import TensorFlow. TensorFlow's import, the
Keras load and the graph trace cost ~12 CPU s and ~1 GB of memory in every process that scores
(every scan, watcher, restarted Celery worker); LiteRT loads the same graph in ~0.2 s. The Keras
model stays the source of truth: training, Grad-CAM and GPUs use it, and the export is checked
against it here (every output, on real-looking inputs) before it is written.

The sidecar ``model.tflite.json`` records which files it was made from (their SHA-256): a model
folder whose Keras model or guard changed afterwards is served by TensorFlow until it is exported
again (``cxr-triage model export-lite``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.inference import Scorer
from pipeline.model_folder import LITE_MODEL_FILE, LITE_SIDECAR_FILE, lite_sources_digest

#: Largest difference allowed between the exported graph's outputs and TensorFlow's (logits,
#: features, distances alike: float32 round-off from other kernels, nothing more).
EXPORT_TOLERANCE = 1e-2
#: Batch of the check: a fixed seed, so an export is reproducible.
CHECK_BATCH = 16


def export_lite(model_dir: str | Path) -> dict:
    """Write ``model.tflite`` and its sidecar into ``model_dir``; returns the sidecar's content."""
    import tensorflow as tf

    model_dir = Path(model_dir)
    scorer = Scorer.load(model_dir, engine="tensorflow")
    concrete = scorer._fn.get_concrete_function()  # noqa: SLF001 - the serving graph itself
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], scorer._fn)  # noqa: SLF001
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
    probe = np.random.default_rng(0).standard_normal(
        (CHECK_BATCH, scorer.input_size, scorer.input_size, 1)
    ).astype(np.float32)
    expected = {name: np.asarray(value) for name, value in scorer._fn(probe).items()}  # noqa: SLF001
    outputs, differences = _match_outputs(flatbuffer, probe, expected)
    (model_dir / LITE_MODEL_FILE).write_bytes(flatbuffer)
    sidecar = {
        "sources_sha256": lite_sources_digest(model_dir),
        "outputs": outputs,
        "exported_with": f"tensorflow {tf.__version__}",
        "max_abs_difference": differences,
    }
    (model_dir / LITE_SIDECAR_FILE).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def _match_outputs(
    flatbuffer: bytes, probe: np.ndarray, expected: dict[str, np.ndarray]
) -> tuple[dict[str, str], dict[str, float]]:
    """Name each output tensor of the flatbuffer (they are called ``Identity_N``) by the TensorFlow
    output it equals on ``probe``; refuse an export in which any output differs."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=flatbuffer)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, probe.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, probe)
    interpreter.invoke()
    outputs: dict[str, str] = {}
    differences: dict[str, float] = {}
    for detail in interpreter.get_output_details():
        value = interpreter.get_tensor(detail["index"])
        gaps = {
            name: float(np.abs(value - reference).max())
            for name, reference in expected.items()
            if reference.shape == value.shape and name not in differences
        }
        name = min(gaps, key=gaps.get) if gaps else None
        if name is None or gaps[name] > EXPORT_TOLERANCE * max(1.0, float(np.abs(expected[name]).max())):
            raise RuntimeError(f"LiteRT output {detail['name']} matches no TensorFlow output ({gaps})")
        outputs[detail["name"]] = name
        differences[name] = gaps[name]
    if set(outputs.values()) != set(expected):
        raise RuntimeError(f"LiteRT export lacks outputs: {sorted(set(expected) - set(outputs.values()))}")
    return outputs, differences
