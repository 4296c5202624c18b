"""Repeated site-calibration draws on the held-out validation films (the model card's table).

Each draw plays one site: 40 normal and 60 pneumonia films of distinct validation patients (one
film each) are the labelled sample that ``cxr-triage model calibrate`` would fit
(:func:`models.calibration.calibrate`, default targets), and every film of the *other*
validation patients checks the fitted thresholds. The films are scored once, through the
serving path (:meth:`pipeline.inference.Scorer.score_files`); films the input-validity guard
rejects are left out, as ``calibrate`` leaves them out. No patient is on both sides of a draw.

Run: ``python -m models.site_draws ../shared/data/kermany-cxr224/train [--draws 40]``; it prints
one JSON object (each draw, and the mean / 10th percentile / worst / best of each figure).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import data
from models.calibration import calibrate
from models.metrics import operating_point

SAMPLE_NORMAL, SAMPLE_PNEUMONIA = 40, 60
TARGETS = {"screening_sensitivity": 0.95, "screening_specificity": 0.75, "high_confidence_specificity": 0.95}


@dataclass(frozen=True)
class HeldOut:
    """Scored validation films: label, patient, served probability and logit (guard-rejected left out)."""

    labels: np.ndarray
    patients: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    temperature: float
    rejected: int


def site_sample(patients: Sequence[str], labels: Sequence[int], rng: np.random.Generator) -> list[int]:
    """Indices of one site's labelled sample: the first film of 40 normal and 60 pneumonia patients,
    taken in a random order of the patients (normals first)."""
    first: dict[str, int] = {}
    for index, patient in enumerate(patients):
        first.setdefault(patient, index)
    order = rng.permutation(sorted(first))
    chosen: list[int] = []
    for label, count in ((0, SAMPLE_NORMAL), (1, SAMPLE_PNEUMONIA)):
        chosen += [first[p] for p in order if labels[first[p]] == label][:count]
    return chosen


def score_held_out(data_dir: str | Path, model_dir: str | Path | None = None) -> HeldOut:
    from models import default_model_dir
    from pipeline.inference import Scorer

    scorer = Scorer.load(model_dir or default_model_dir())
    val = data.read_split()
    samples = [s for s in data.list_samples(data_dir) if s.patient in val]
    scores = scorer.score_files([s.path for s in samples], batch_size=32)
    kept = [(s, score) for s, score in zip(samples, scores, strict=True) if not score.out_of_distribution]
    return HeldOut(
        labels=np.array([s.pneumonia for s, _ in kept]),
        patients=np.array([s.patient for s, _ in kept]),
        probabilities=np.array([score.pneumonia_probability for _, score in kept]),
        logits=np.array([score.pneumonia_logit for _, score in kept]),
        temperature=scorer.temperature,
        rejected=len(samples) - len(kept),
    )


def one_draw(held: HeldOut, rng: np.random.Generator) -> dict[str, float]:
    """Fit on one random site sample, report the four figures on the films of the other patients."""
    chosen = site_sample(held.patients, held.labels, rng)
    in_sample = np.isin(held.patients, held.patients[chosen])
    fit = calibrate(held.labels[chosen], held.probabilities[chosen], held.logits[chosen], held.temperature)
    y, p = held.labels[~in_sample], held.probabilities[~in_sample]
    screening = operating_point(y, p, fit.screening_threshold)
    high = operating_point(y, p, fit.high_confidence_threshold)
    return {
        "screening_threshold": fit.screening_threshold,
        "high_confidence_threshold": fit.high_confidence_threshold,
        "remaining": int(len(y)),
        "screening_sensitivity": screening.sensitivity,
        "screening_specificity": screening.specificity,
        "high_confidence_sensitivity": high.sensitivity,
        "high_confidence_specificity": high.specificity,
    }


FIGURES = ("screening_sensitivity", "screening_specificity", "high_confidence_sensitivity",
           "high_confidence_specificity")  # fmt: skip


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "mean": round(float(np.mean(values)), 3),
        "p10": round(float(np.percentile(values, 10)), 3),
        "worst": round(float(np.min(values)), 3),
        "best": round(float(np.max(values)), 3),
    }


def summarise(draws: list[dict[str, float]]) -> dict:
    summary: dict = {name: _spread([d[name] for d in draws]) for name in FIGURES}
    met = [all(d[name] >= floor for name, floor in TARGETS.items()) for d in draws]
    summary["all_targets_met"] = f"{sum(met)} of {len(draws)}"
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "data_dir", type=Path, help="kermany-cxr224/train layout (the validation patients are used)"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the shipped model")
    parser.add_argument("--draws", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    held = score_held_out(args.data_dir, args.model_dir)
    rng = np.random.default_rng(args.seed)
    draws = [one_draw(held, rng) for _ in range(args.draws)]
    print(json.dumps({"films": len(held.labels), "rejected_by_guard": held.rejected,
                      "summary": summarise(draws), "draws": draws}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
