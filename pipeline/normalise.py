"""The one preprocessing path shared by training and serving.

Decoders hand over display-ready grey levels in [0, 1] (0 = black, as on a
MONOCHROME2 display). :func:`to_model_input` resizes them to the model's square
input, without keeping the aspect ratio (the training films were resized the
same way), and standardises intensities per image. Per-image standardisation
makes the score invariant to affine changes of grey levels, so the same film
delivered as 8-bit JPEG, 16-bit PNG or 12-bit DICOM gives the same input.
"""

from __future__ import annotations

import numpy as np

EPSILON = 1e-6


def resize_square(grey: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D float image to ``size`` x ``size`` with antialiased bilinear filtering."""
    if grey.shape == (size, size):
        return grey.astype(np.float32, copy=False)
    # Pillow is imported where films are resized (the decoders), not by every importer of this module
    # (a scan's own process only hands files to its decode children).
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), mode="F")
    return np.asarray(image.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def standardise(pixels: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per image; a flat image becomes all zeros."""
    pixels = pixels.astype(np.float32, copy=False)
    mean = float(pixels.mean())
    std = float(pixels.std())
    return (pixels - mean) / (std + EPSILON) if std > EPSILON else np.zeros_like(pixels)


def to_model_input(grey: np.ndarray, size: int) -> np.ndarray:
    """Model input tensor of shape (size, size, 1), float32, from grey levels in [0, 1]."""
    if grey.ndim != 2:
        raise ValueError(f"expected a 2-D grey image, got shape {grey.shape}")
    return standardise(resize_square(grey, size))[..., np.newaxis]
