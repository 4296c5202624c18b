"""The pneumonia model: architectures, training data, training, evaluation and explanation.

The shipped model (Keras file, ``metadata.json``, ``MODEL_CARD.md``) lives in ``models/shipped``
and is installed as package data.
"""

from __future__ import annotations

from pathlib import Path


def default_model_dir() -> Path:
    """Directory of the packaged, shipped model."""
    return Path(__file__).resolve().parent / "shipped"
