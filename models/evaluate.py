"""Evaluate a model directory over a NORMAL/ + PNEUMONIA/ folder through the serving path.

Each file is decoded with :func:`pipeline.decode.decode_file`, preprocessed with
:func:`pipeline.normalise.to_model_input` and scored by :class:`pipeline.inference.Scorer`,
exactly as the worker does. ``split="val"`` restricts the folder to the validation patients
of the shipped split file, which reproduces the model card's validation figures.

Run: ``cxr-triage model evaluate DATA_DIR --split val``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models import data, default_model_dir
from models.metrics import OperatingPoint, operating_point, roc_auc, roc_curve


@dataclass
class EvaluationReport:
    """Figures of one evaluation."""

    model_version: str
    images: int
    positives: int
    roc_auc: float
    viral_roc_auc: float | None
    screening: OperatingPoint
    high_confidence: OperatingPoint
    roc_png: str | None = None
    # Bootstrap 95 % CIs (models.calibration) and the operating points of other calibrations:
    intervals: dict = field(default_factory=dict)
    calibrations: dict = field(default_factory=dict)
    out_of_distribution: int = 0
    labels: np.ndarray | None = field(default=None, repr=False)
    probabilities: np.ndarray | None = field(default=None, repr=False)

    def add_calibration(self, name: str, screening: float, high_confidence: float) -> None:
        """Sensitivity and specificity with CIs at a stored calibration's thresholds."""
        from models.calibration import estimate_at

        y, prob = self.labels, self.probabilities
        assert y is not None and prob is not None
        self.calibrations[name] = {
            "screening": estimate_at(y, prob, screening, seed=11).as_dict(),
            "high_confidence": estimate_at(y, prob, high_confidence, seed=12).as_dict(),
        }

    def as_dict(self) -> dict:
        """Plain dict for JSON output."""
        return {
            "intervals": self.intervals,
            "calibrations": self.calibrations,
            "out_of_distribution": self.out_of_distribution,
            "model_version": self.model_version,
            "images": self.images,
            "positives": self.positives,
            "roc_auc": round(self.roc_auc, 4),
            "viral_roc_auc": None if self.viral_roc_auc is None else round(self.viral_roc_auc, 4),
            "screening": self.screening.as_dict(),
            "high_confidence": self.high_confidence.as_dict(),
            "roc_png": self.roc_png,
        }

    def text(self) -> str:
        """Human-readable summary."""
        lines = [
            f"model {self.model_version}: {self.images} images ({self.positives} pneumonia)",
            f"ROC AUC {self.roc_auc:.4f}"
            + ("" if self.viral_roc_auc is None else f"; bacterial-vs-viral AUC {self.viral_roc_auc:.4f}"),
        ]
        for name, point in (("screening", self.screening), ("high-confidence", self.high_confidence)):
            lines.append(
                f"{name} threshold {point.threshold:.4f}: sensitivity {point.sensitivity:.4f}, "
                f"specificity {point.specificity:.4f}, accuracy {point.accuracy:.4f}, "
                f"confusion TP={point.tp} FN={point.fn} TN={point.tn} FP={point.fp}"
            )
        lines += _interval_lines(self.intervals, self.calibrations)
        if self.out_of_distribution:
            lines.append(f"{self.out_of_distribution} film(s) flagged out of distribution (counted above)")
        if self.roc_png:
            lines.append(f"ROC curve written to {self.roc_png}")
        return "\n".join(lines)


def _ci(entry: dict) -> str:
    return f"{entry['value']:.4f} [{entry['low']:.4f}-{entry['high']:.4f}]"


def _interval_lines(intervals: dict, calibrations: dict) -> list[str]:
    """Bootstrap CI lines: AUC, then each calibration's operating points."""
    lines = []
    if "roc_auc" in intervals:
        lines.append(f"ROC AUC 95 % bootstrap CI: {_ci(intervals['roc_auc'])}")
    every = {"model thresholds": intervals} if "screening" in intervals else {}
    for name, points in {**every, **calibrations}.items():
        for kind in ("screening", "high_confidence"):
            point = points[kind]
            lines.append(
                f"{name}, {kind.replace('_', '-')} {point['threshold']:.4f}: sensitivity "
                f"{_ci(point['sensitivity'])}, specificity {_ci(point['specificity'])} (95 % bootstrap CIs)"
            )
    return lines


def select_samples(
    data_dir: str | Path,
    split: str = "all",
    files: Iterable[str] | None = None,
    split_file: Path | None = None,
) -> list[data.Sample]:
    """Samples of ``data_dir``; ``split='val'`` keeps the split file's patients; ``files`` keeps names."""
    samples = data.list_samples(data_dir)
    if split == "val":
        val = data.read_split(split_file or data.SPLIT_FILE)
        samples = [s for s in samples if s.patient in val]
    elif split != "all":
        raise ValueError("split must be 'all' or 'val'")
    if files is not None:
        keep = set(files)
        samples = [s for s in samples if s.name in keep or s.path.name in keep]
    return samples


def write_roc_png(y: np.ndarray, prob: np.ndarray, report: EvaluationReport, out_png: str | Path) -> None:
    """Write the ROC curve with both operating points marked (drawn with Pillow: no plotting library)."""
    from PIL import Image, ImageDraw

    size, left, bottom, top, right = 500, 60, 50, 30, 20
    width, height = size - left - right, size - top - bottom
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)

    def at(fpr: float, tpr: float) -> tuple[float, float]:
        return left + fpr * width, top + (1.0 - tpr) * height

    draw.rectangle([at(0, 1), at(1, 0)], outline="black")
    for tick in np.linspace(0.0, 1.0, 6):
        x, y_ = at(tick, tick)
        draw.line([(x, top + height), (x, top + height + 4)], fill="black")
        draw.line([(left - 4, y_), (left, y_)], fill="black")
        draw.text((x - 8, top + height + 6), f"{tick:.1f}", fill="black")
        draw.text((left - 28, y_ - 6), f"{tick:.1f}", fill="black")
    draw.line([at(0, 0), at(1, 1)], fill="grey")  # chance
    fpr, tpr, _ = roc_curve(y, prob)
    draw.line([at(f, t) for f, t in zip(fpr, tpr, strict=True)], fill=(31, 119, 180), width=2)
    legend = [(f"ROC (AUC {report.roc_auc:.4f})", (31, 119, 180))]
    for name, point, colour in (
        ("screening", report.screening, (255, 127, 14)),
        ("high confidence", report.high_confidence, (44, 160, 44)),
    ):
        x, y_ = at(1 - point.specificity, point.sensitivity)
        draw.ellipse([x - 5, y_ - 5, x + 5, y_ + 5], fill=colour)
        legend.append((f"{name} (t={point.threshold:.3f})", colour))
    for row, (label, colour) in enumerate(legend):
        y_ = top + height - 20 - 16 * (len(legend) - 1 - row)
        draw.rectangle([left + width - 190, y_ + 3, left + width - 180, y_ + 11], fill=colour)
        draw.text((left + width - 175, y_), label, fill="black")
    draw.text((left, 8), report.model_version, fill="black")
    draw.text((left + width / 2 - 40, size - 20), "1 - specificity", fill="black")
    draw.text((4, top + height / 2), "sensitivity", fill="black")
    image.save(out_png)


def evaluate(
    data_dir: str | Path,
    model_dir: str | Path | None = None,
    roc_png: str | Path | None = None,
    batch_size: int = 32,
    split: str = "all",
    files: Iterable[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> EvaluationReport:
    """Score every selected image of ``data_dir`` and report AUC and the operating points."""
    from pipeline.inference import Scorer

    scorer = Scorer.load(model_dir or default_model_dir())
    samples = select_samples(data_dir, split, files)
    if not samples:
        raise ValueError("no images selected")
    probs, virals = [], []
    flagged = 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        for score in scorer.score_files([s.path for s in chunk], batch_size=batch_size):
            flagged += int(score.out_of_distribution)
            probs.append(score.pneumonia_probability)
            virals.append(np.nan if score.viral_probability is None else score.viral_probability)
        if progress:
            progress(min(start + batch_size, len(samples)), len(samples))
    y, v = data.labels(samples)
    prob, viral = np.array(probs), np.array(virals)
    mask = (v >= 0) & ~np.isnan(viral)
    viral_auc = roc_auc(v[mask], viral[mask]) if mask.any() else None
    report = EvaluationReport(
        model_version=scorer.version,
        images=len(samples),
        positives=int(y.sum()),
        roc_auc=roc_auc(y, prob),
        viral_roc_auc=None if viral_auc is None or np.isnan(viral_auc) else viral_auc,
        screening=operating_point(y, prob, scorer.screening_threshold),
        high_confidence=operating_point(y, prob, scorer.high_confidence_threshold),
        roc_png=str(roc_png) if roc_png else None,
        out_of_distribution=flagged,
        labels=y,
        probabilities=prob,
    )
    report.intervals = _intervals(y, prob, scorer.screening_threshold, scorer.high_confidence_threshold)
    if roc_png:
        write_roc_png(y, prob, report, roc_png)
    return report


def _intervals(y: np.ndarray, prob: np.ndarray, screening: float, high_confidence: float) -> dict:
    """Bootstrap 95 % CIs of AUC and of both operating points at the model's own thresholds."""
    from models.calibration import auc_interval, estimate_at

    if y.min() == y.max():
        return {}
    return {
        "roc_auc": auc_interval(y, prob, draws=1000, seed=10).as_dict(),
        "screening": estimate_at(y, prob, screening, seed=11).as_dict(),
        "high_confidence": estimate_at(y, prob, high_confidence, seed=12).as_dict(),
    }

