"""Comparison table of trained model folders on the same patient-wise validation split.

For each folder: parameters, file size, training wall time, validation ROC AUC, sensitivity
and specificity at its own validation-fitted thresholds (:func:`models.train.calibration`),
bacterial-vs-viral AUC, the stress-test AUCs (:mod:`models.robustness`) and CPU throughput
at batch 32. Optionally a test-time-augmentation row (original + small zooms) for the first folder.

Run: ``cxr-triage model compare .work/runs/baseline128 .work/runs/resnet128 ... --data-dir DATA``.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import numpy as np

from models.metrics import operating_point, roc_auc
from models.train import calibration
from pipeline.probability import sigmoid


def _figures(y: np.ndarray, v: np.ndarray, p: np.ndarray, vl: np.ndarray) -> dict:
    cal = calibration(y, p)
    prob = sigmoid(p, cal["temperature"])
    screening, high = cal["screening_threshold"], cal["high_confidence_threshold"]
    s, h = operating_point(y, prob, screening), operating_point(y, prob, high)
    mask = v >= 0
    return {
        "auc": round(roc_auc(y, p), 4),
        "screen_sens": round(s.sensitivity, 4),
        "screen_spec": round(s.specificity, 4),
        "high_sens": round(h.sensitivity, 4),
        "high_spec": round(h.specificity, 4),
        "viral_auc": round(roc_auc(v[mask], vl[mask]), 4),
    }


def inference_rate(scorer, batch: int, seconds: float = 2.0, repetitions: int = 5) -> float:
    """Median images/s of ``scorer.score_batch`` on ready tensors over ``repetitions`` timed runs.

    Also the measurement of ``bench/bench_inference.py``, so both report the same figure.
    """
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, scorer.input_size, scorer.input_size, 1)).astype(np.float32)
    for _ in range(3):  # warm-up (graph tracing, oneDNN primitive caches)
        scorer.score_batch(x)
    rates = []
    for _ in range(repetitions):
        calls, start = 0, time.perf_counter()
        while True:
            scorer.score_batch(x)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / repetitions and calls >= 2:
                break
        rates.append(calls * batch / elapsed)
    return statistics.median(rates)


def tta_logits(
    model_dir: Path, data_dir: str | Path, cache_dir: str | Path | None = None,
    zooms: tuple[float, ...] = (1.0, 1.06, 1.12),
) -> tuple[np.ndarray, ...]:  # fmt: skip
    """Validation logits averaged over centre crops (zoom-ins) of the validation images."""
    import tensorflow as tf

    from models.architectures import load_trained
    from models.augment import standardise_tf
    from models.ensemble import logits_on, validation_set

    model, metadata = load_trained(model_dir)
    size = metadata["input_size"]

    class Zoomed:
        def __init__(self, zoom: float) -> None:
            self.zoom = zoom

        def __call__(self, x, training=False):
            side = int(round(size / self.zoom))
            img = tf.image.resize_with_crop_or_pad(tf.convert_to_tensor(x), side, side)
            img = tf.image.resize(img, (size, size), method="bilinear", antialias=True)
            return model(standardise_tf(img[..., 0]), training=False)

    y, v, grey = validation_set(size, data_dir, cache_dir)
    runs = [logits_on(Zoomed(z), grey) for z in zooms]
    return y, v, np.mean([r[0] for r in runs], axis=0), np.mean([r[1] for r in runs], axis=0)


def row(model_dir: Path, data_dir: str | Path, with_stress: bool = True, with_bench: bool = True) -> dict:
    """All comparison figures of one model folder."""
    from models.robustness import stress_test
    from pipeline.inference import Scorer

    metadata = json.loads((model_dir / "metadata.json").read_text())
    logits = np.load(model_dir / "val_logits.npz")
    scorer = Scorer.load(model_dir, engine="tensorflow")  # the Keras model itself: its parameters
    result = {
        "model": model_dir.name,
        "version": metadata["version"],
        "params": int(scorer._model.count_params()),
        "size_mb": round((model_dir / metadata["model_file"]).stat().st_size / 2**20, 2),
        "train_min": round(metadata["training_wall_seconds"] / 60, 1),
        **_figures(logits["y"], logits["v"], logits["p"], logits["vl"]),
    }
    if with_bench:
        result["img_per_s_b32"] = round(inference_rate(scorer, 32, seconds=2.0), 0)
    if with_stress:
        stress = stress_test(data_dir, model_dir)["results"]
        result["stress_mean_auc"] = stress["mean_perturbed_auc"]
        result["stress_min_auc"] = stress["min_perturbed_auc"]
        result["stress"] = stress
    return result


def markdown(rows: list[dict]) -> str:
    """Markdown table of comparison rows."""
    cols = [
        "model", "params", "size_mb", "train_min", "auc", "screen_sens", "screen_spec",
        "high_sens", "high_spec", "viral_auc", "stress_mean_auc", "stress_min_auc", "img_per_s_b32",
    ]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def compare(
    model_dirs: list[Path],
    data_dir: str | Path,
    *,
    tta: bool = False,
    stress: bool = True,
    bench: bool = True,
    cache_dir: str | Path | None = None,
) -> list[dict]:
    """Comparison rows of ``model_dirs``, plus a zoom-TTA row for the first one if ``tta``."""
    rows = [row(d, data_dir, stress, bench) for d in model_dirs]
    if tta:
        figures = _figures(*tta_logits(model_dirs[0], data_dir, cache_dir))
        rows.append({"model": f"{model_dirs[0].name} + zoom TTA x3", **figures})
    return rows
