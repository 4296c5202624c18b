"""The shift check: how a model ranks films from other hospitals, and whether it reads the edges.

Two measurements that the saturated validation split cannot give:

* **External check** (:func:`external_check`): every film of a folder laid out like
  ``external-cxr`` (``manifest.csv`` with ``file``, ``label``, ``view`` and ``patient``) goes
  through the serving path (decode -> model input -> scorer -> input checks). Films the checks
  turn away are counted by reason; ROC AUC is reported over the films scored and over all films
  (as the model ranks them), with a 95 % bootstrap interval that resamples *patients* (several
  films per patient), and per view. Sensitivity and specificity at the model's thresholds get
  Wilson intervals. Never fit a threshold on this folder: it is a check, not a calibration set.
* **Border probes** (:func:`border_probes`): the outer 8 % / 12 % of each side of every film is
  replaced by the film's mean grey, or by black (a collimated film), before preprocessing. A model
  that reads the lungs loses almost nothing; one that reads markers, arms and corners collapses.

Run: ``cxr-triage model evaluate DATA_DIR --external DIR`` (the probes run on both sets).
"""

from __future__ import annotations

import csv
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.metrics import operating_point, roc_auc

#: Border probes: (name, share of each side, fill) -- fill "mean" is the film's mean grey.
PROBES: tuple[tuple[str, float, str], ...] = (
    ("mean_grey_8%", 0.08, "mean"),
    ("mean_grey_12%", 0.12, "mean"),
    ("black_8%", 0.08, "black"),
    ("black_12%", 0.12, "black"),
)
BOOTSTRAP_DRAWS = 1000


@dataclass(frozen=True)
class ExternalFilm:
    """One film of the external manifest."""

    path: Path
    label: int
    view: str
    patient: str


def read_external(folder: str | Path) -> list[ExternalFilm]:
    """The films of an external-check folder (``manifest.csv``: file, label, view, patient)."""
    folder = Path(folder)
    with (folder / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    films = [
        ExternalFilm(folder / r["file"], int(r["label"] == "pneumonia"), r.get("view", ""), r["patient"])
        for r in rows
    ]
    if not films:
        raise ValueError(f"no films listed in {folder / 'manifest.csv'}")
    return films


def with_border(grey: np.ndarray, share: float, fill: str) -> np.ndarray:
    """The film with the outer ``share`` of each side replaced by its mean grey or by black."""
    out = np.array(grey, dtype=np.float32, copy=True)
    height, width = out.shape
    dy, dx = int(round(height * share)), int(round(width * share))
    value = float(grey.mean()) if fill == "mean" else 0.0
    if dy:
        out[:dy, :] = value
        out[-dy:, :] = value
    if dx:
        out[:, :dx] = value
        out[:, -dx:] = value
    return out


def wilson(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion ((nan, nan) with no trials)."""
    if trials == 0:
        return (float("nan"), float("nan"))
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return (float(centre - half), float(centre + half))


def patient_bootstrap_auc(
    y: np.ndarray, prob: np.ndarray, patients: list[str], draws: int = BOOTSTRAP_DRAWS, seed: int = 0
) -> tuple[float, float]:
    """95 % percentile interval of ROC AUC, resampling patients (all their films) with replacement."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, patient in enumerate(patients):
        groups[patient].append(i)
    members = [np.array(v) for v in groups.values()]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[k] for k in pick])
        if y[idx].min() != y[idx].max():
            values.append(roc_auc(y[idx], prob[idx]))
    if not values:
        return (float("nan"), float("nan"))
    low, high = np.percentile(values, [2.5, 97.5])
    return (float(low), float(high))


@dataclass
class Scored:
    """What the serving path made of a list of films."""

    prob: np.ndarray  # calibrated probability (NaN where the film could not be decoded)
    turned_away: list[str | None]  # the input checks' reason per film, None where it was accepted
    lung_share: list[float | None] = field(default_factory=list)


def score_greys(scorer, greys: list[np.ndarray | None], batch: int = 32) -> tuple[np.ndarray, list]:
    """(probability, reason-or-None) per decoded film (None entries: not decoded)."""
    prob = np.full(len(greys), np.nan)
    reasons: list[str | None] = [None] * len(greys)
    ready = [i for i, g in enumerate(greys) if g is not None]
    for start in range(0, len(ready), batch):
        chunk = ready[start : start + batch]
        made = [scorer.model_input(greys[i]) for i in chunk]
        scores = scorer.score_batch(np.stack([tensor for tensor, _ in made]))
        for i, (_, fields), score in zip(chunk, made, scores, strict=True):
            prob[i] = score.pneumonia_probability
            reasons[i] = scorer.input_check(score, fields)
    return prob, reasons


def _decode_all(paths: list[Path]) -> tuple[list[np.ndarray | None], list[str | None]]:
    from pipeline.decode import decode_file
    from pipeline.errors import ImageProblem

    greys: list[np.ndarray | None] = []
    problems: list[str | None] = []
    for path in paths:
        try:
            greys.append(decode_file(path).pixels)
            problems.append(None)
        except ImageProblem as exc:
            greys.append(None)
            problems.append(str(exc))
    return greys, problems


def _reason_class(reason: str) -> str:
    """A short class for a turned-away reason (the text before any detail in brackets)."""
    return reason.split(" (")[0].split(":")[0]


def external_check(scorer, folder: str | Path, progress: Callable[[str], None] | None = None) -> dict:
    """The external shift check of ``scorer`` on a folder (see the module docstring)."""
    films = read_external(folder)
    greys, problems = _decode_all([f.path for f in films])
    prob, reasons = score_greys(scorer, greys)
    reasons = [p or r for p, r in zip(problems, reasons, strict=True)]
    y = np.array([f.label for f in films])
    patients = [f.patient for f in films]
    kept = np.array([r is None for r in reasons])
    decoded = ~np.isnan(prob)
    report = {
        "films": len(films),
        "pneumonia": int(y.sum()),
        "normal": int((1 - y).sum()),
        "turned_away": int((~kept).sum()),
        "turned_away_share": round(float((~kept).mean()), 4),
        "turned_away_by_reason": dict(Counter(_reason_class(r) for r in reasons if r).most_common()),
        "scored": _ranking(y[kept], prob[kept], [p for p, k in zip(patients, kept, strict=True) if k]),
        "all_decoded": _ranking(
            y[decoded], prob[decoded], [p for p, d in zip(patients, decoded, strict=True) if d]
        ),
        "by_view": {},
        "operating_points": _operating_points(scorer, y[kept], prob[kept]),
        "border_probes": border_probes(scorer, [g for g in greys if g is not None], y[decoded]),
    }
    views = np.array([f.view or "unrecorded" for f in films])
    for view in sorted(set(views[decoded])):
        pick = decoded & (views == view)
        if y[pick].min() != y[pick].max():
            report["by_view"][view] = {
                "films": int(pick.sum()),
                "normal": int((1 - y[pick]).sum()),
                "roc_auc": round(roc_auc(y[pick], prob[pick]), 4),
            }
    if progress:
        progress(f"external check: {len(films)} films")
    return report


def _ranking(y: np.ndarray, prob: np.ndarray, patients: list[str]) -> dict:
    if len(y) == 0 or y.min() == y.max():
        return {"films": int(len(y)), "roc_auc": None}
    low, high = patient_bootstrap_auc(y, prob, patients)
    return {
        "films": int(len(y)),
        "patients": len(set(patients)),
        "roc_auc": round(roc_auc(y, prob), 4),
        "roc_auc_ci95_by_patient": [round(low, 4), round(high, 4)],
    }


def _operating_points(scorer, y: np.ndarray, prob: np.ndarray) -> dict:
    points = {}
    for name, threshold in (
        ("screening", scorer.screening_threshold),
        ("high_confidence", scorer.high_confidence_threshold),
    ):
        point = operating_point(y, prob, threshold)
        points[name] = {
            "threshold": round(threshold, 4),
            "sensitivity": round(point.sensitivity, 4),
            "sensitivity_ci95": [round(v, 4) for v in wilson(point.tp, point.tp + point.fn)],
            "specificity": round(point.specificity, 4),
            "specificity_ci95": [round(v, 4) for v in wilson(point.tn, point.tn + point.fp)],
        }
    return points


def border_probes(scorer, greys: list[np.ndarray], y: np.ndarray) -> dict:
    """ROC AUC of ``scorer`` on the films as they are and under each border probe (all decoded films
    are scored: the probe measures the ranking, not the input checks)."""
    from models.calibration import auc_interval

    plain, _ = score_greys(scorer, greys)
    base = roc_auc(y, plain)
    interval = auc_interval(y, plain)  # stratified by class, not by patient: for the shipping rule
    result = {"films": len(greys), "none": round(base, 4)}
    result["none_ci95"] = [round(interval.low, 4), round(interval.high, 4)]
    for name, share, fill in PROBES:
        prob, _ = score_greys(scorer, [with_border(g, share, fill) for g in greys])
        auc = roc_auc(y, prob)
        result[name] = round(auc, 4)
        result[f"{name}_drop"] = round(base - auc, 4)
    return result


def validation_probes(scorer, data_dir: str | Path) -> dict:
    """:func:`border_probes` on the patient-wise validation films of a Kermany-style folder."""
    from models import data
    from pipeline.decode import decode_file

    validation = data.partition(data.list_samples(data_dir), data.read_split())[1]
    y, _ = data.labels(validation)
    return border_probes(scorer, [decode_file(s.path).pixels for s in validation], y)


def _ci(values: list[float]) -> str:
    return f"[{values[0]:.3f}-{values[1]:.3f}]"


def _probe_line(where: str, probes: dict) -> str:
    drops = ", ".join(f"{name} {probes[name]:.3f} ({-probes[f'{name}_drop']:+.3f})" for name, *_ in PROBES)
    return f"border probes ({where}, {probes['films']} films): AUC {probes['none']:.3f}; {drops}"


def shift_text(shift: dict) -> list[str]:
    """Human-readable lines of the shift check and border probes (see :func:`external_check`)."""
    lines = []
    if "border_probes" in shift:
        lines.append(_probe_line("these films", shift["border_probes"]))
    ext = shift.get("external")
    if ext:
        scored, every = ext["scored"], ext["all_decoded"]
        reasons = "; ".join(f"{n} {reason}" for reason, n in ext["turned_away_by_reason"].items()) or "none"
        lines += [
            f"external films: {ext['films']} ({ext['pneumonia']} pneumonia, {ext['normal']} normal); "
            f"turned away by the input checks: {ext['turned_away']} ({ext['turned_away_share']:.1%}): "
            + reasons,
            f"external ROC AUC on the {scored['films']} scored: {scored['roc_auc']:.3f} "
            f"{_ci(scored['roc_auc_ci95_by_patient'])} (95 % CI, bootstrap by patient); on all "
            f"{every['films']} decoded: {every['roc_auc']:.3f} {_ci(every['roc_auc_ci95_by_patient'])}",
            "by view: "
            + ", ".join(
                f"{v} {d['roc_auc']:.3f} ({d['films']} films, {d['normal']} normal)"
                for v, d in ext["by_view"].items()
            ),
        ]
        for name, point in ext["operating_points"].items():
            lines.append(
                f"external, {name.replace('_', '-')} {point['threshold']:.4f}: sensitivity "
                f"{point['sensitivity']:.3f} {_ci(point['sensitivity_ci95'])}, specificity "
                f"{point['specificity']:.3f} {_ci(point['specificity_ci95'])} (Wilson 95 %)"
            )
        lines.append(_probe_line("external", ext["border_probes"]))
    return lines


def attention_report(scorer, args, count: int) -> dict:
    """:func:`models.attention.lung_attention` on ``count`` seeded validation and external films."""
    from models import data
    from models.attention import lung_attention
    from pipeline.decode import decode_file
    from pipeline.lungs import LungModel

    lungs = LungModel(args.lung_model)
    rng = np.random.default_rng(5)
    out = {}
    if args.data_dir:
        validation = data.partition(data.list_samples(args.data_dir), data.read_split())[1]
        pick = rng.choice(len(validation), min(count, len(validation)), replace=False)
        greys = [decode_file(validation[i].path).pixels for i in pick]
        out["validation"] = lung_attention(scorer, greys, lungs)
    films = read_external(args.external)
    pick = rng.choice(len(films), min(count, len(films)), replace=False)
    greys, _ = _decode_all([films[i].path for i in pick])
    out["external"] = lung_attention(scorer, [g for g in greys if g is not None], lungs)
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m models.external MODEL_DIR --external DIR [--data-dir DIR] [--out FILE]``."""
    import argparse
    import json

    from pipeline.inference import Scorer

    parser = argparse.ArgumentParser(prog="python -m models.external", description=main.__doc__)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--external", type=Path, required=True, help="folder laid out like external-cxr")
    parser.add_argument("--data-dir", type=Path, help="Kermany-style folder: border probes on validation")
    parser.add_argument("--out", type=Path, help="also write the report here (JSON)")
    parser.add_argument(
        "--attention",
        type=int,
        default=0,
        metavar="N",
        help="also measure the Grad-CAM share inside the lung fields on N validation and N external films"
        " (needs TensorFlow and --lung-model)",
    )
    parser.add_argument("--lung-model", type=Path, help="lungs.tflite that draws the lung masks")
    args = parser.parse_args(argv)
    scorer = Scorer.load(args.model_dir)
    report = {"model_version": scorer.version, "external": external_check(scorer, args.external)}
    if args.data_dir:
        report["validation_border_probes"] = validation_probes(scorer, args.data_dir)
    if args.attention:
        report["lung_attention"] = attention_report(scorer, args, args.attention)
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
