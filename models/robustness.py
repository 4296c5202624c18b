"""Stress test: validation ROC AUC and operating points under acquisition-like perturbations.

The patient-wise validation split comes from the same hospital and period as the training
data, so its AUC saturates near 1.0 and cannot tell designs apart. As a rough proxy for
acquisition shift, every validation film is perturbed *before* the serving preprocessing
(:attr:`pipeline.inference.Scorer.model_input`): gamma, blur, JPEG re-compression, histogram
equalisation, tighter and wider field of view. Some of these overlap with the training
augmentation, so this is a sanity check of robustness, not an estimate of external performance.

Run: ``cxr-triage model stress-test DATA_DIR [--model-dir DIR]``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from models import data, default_model_dir
from models.metrics import operating_point, roc_auc
from pipeline.decode import decode_file


def _gamma(g: float) -> Callable[[np.ndarray], np.ndarray]:
    return lambda x: np.power(x, g)


def _blur(x: np.ndarray) -> np.ndarray:
    h, w = x.shape
    small = Image.fromarray(x, mode="F").resize((w // 3, h // 3), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def _jpeg(x: np.ndarray, quality: int = 20) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8), mode="L").save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255.0


def _equalise(x: np.ndarray) -> np.ndarray:
    levels = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    hist = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    cdf = np.cumsum(hist) / hist.sum()
    return cdf[levels].astype(np.float32)


def _crop(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        dh, dw = int(h * (1 - fraction) / 2), int(w * (1 - fraction) / 2)
        return x[dh : h - dh, dw : w - dw]

    return apply


def _pad(fraction: float) -> Callable[[np.ndarray], np.ndarray]:
    def apply(x: np.ndarray) -> np.ndarray:
        h, w = x.shape
        ph, pw = int(h * fraction / 2), int(w * fraction / 2)
        return np.pad(x, ((ph, ph), (pw, pw)), mode="constant", constant_values=0.0)

    return apply


PERTURBATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "none": lambda x: x,
    "gamma_0.6": _gamma(0.6),
    "gamma_1.6": _gamma(1.6),
    "blur_1/3": _blur,
    "jpeg_q20": _jpeg,
    "hist_equalise": _equalise,
    "crop_80%": _crop(0.8),
    "pad_20%": _pad(0.2),
}


def stress_test(data_dir: str | Path, model_dir: str | Path | None = None) -> dict:
    """Per-perturbation AUC / screening sensitivity / specificity on the validation split."""
    from pipeline.inference import Scorer

    scorer = Scorer.load(model_dir or default_model_dir())
    val_patients = data.read_split()
    samples = [s for s in data.list_samples(data_dir) if s.patient in val_patients]
    greys = [decode_file(s.path).pixels for s in samples]
    y, _ = data.labels(samples)
    results = {}
    for name, perturb in PERTURBATIONS.items():
        x = np.stack([scorer.model_input(perturb(g).astype(np.float32))[0] for g in greys])
        prob = np.array(
            [s.pneumonia_probability for i in range(0, len(x), 64) for s in scorer.score_batch(x[i : i + 64])]
        )
        point = operating_point(y, prob, scorer.screening_threshold)
        results[name] = {
            "auc": round(roc_auc(y, prob), 4),
            "screen_sens": round(point.sensitivity, 4),
            "screen_spec": round(point.specificity, 4),
        }
    aucs = [r["auc"] for k, r in results.items() if k != "none"]
    results["mean_perturbed_auc"] = round(float(np.mean(aucs)), 4)
    results["min_perturbed_auc"] = round(float(np.min(aucs)), 4)
    return {"model_version": scorer.version, "results": results}
