"""Calibrated probabilities from raw logits: the one formula, shared by serving (:mod:`pipeline.inference`),
the out-of-distribution guard (:mod:`pipeline.ood`), training and comparison."""

from __future__ import annotations

from typing import Any

import numpy as np


def sigmoid(logits: Any, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probability ``sigmoid(logit / temperature)`` (numerically stable, any shape).

    The one place this formula lives: serving, training calibration, comparison and benchmarks
    all call it, so a stored score and an evaluated score cannot drift apart.
    """
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(logits, dtype=np.float64) / temperature))


def logit_to_probability(logit: float, temperature: float) -> float:
    """Calibrated probability from one raw logit (see :func:`sigmoid`)."""
    return float(sigmoid(logit, temperature))
