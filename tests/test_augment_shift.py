"""The "shift" augmentation (issue 12): each transform changes real films the intended way."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from models.augment import PRESETS, SHIFT, STRONG, AugmentConfig, augment_tf, draw_params
from pipeline.decode import decode_file
from pipeline.normalise import resize_square

pytestmark = pytest.mark.train  # augment_tf runs on TensorFlow

SIZE = 128
#: Everything off: geometry, windowing, gamma and noise are the identity for every image.
OFF = AugmentConfig(probability=0.0, noise_std=0.0)


@pytest.fixture(scope="module")
def films(kermany: Path) -> np.ndarray:
    paths = (
        sorted((kermany / "NORMAL").glob("*.jpeg"))[:4] + sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[:4]
    )
    return np.stack([resize_square(decode_file(p).pixels, SIZE) for p in paths]).astype(np.float32)


def _augment(films: np.ndarray, cfg: AugmentConfig, seed: int = 3) -> np.ndarray:
    out = np.asarray(augment_tf(films, draw_params(np.random.default_rng(seed), len(films), SIZE, cfg)))
    assert out.shape == (*films.shape, 1)
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    return out[..., 0]


def _centre(images: np.ndarray, margin: float) -> np.ndarray:
    m = int(margin * SIZE)
    return images[:, m : SIZE - m, m : SIZE - m]


def test_everything_off_is_the_identity(films):
    np.testing.assert_allclose(_augment(films, OFF), films, atol=1e-4)


def test_preset_is_registered_and_seeded(films):
    assert PRESETS["shift"] is SHIFT
    first, second = _augment(films, SHIFT, seed=11), _augment(films, SHIFT, seed=11)
    np.testing.assert_array_equal(first, second)
    assert not np.allclose(first, _augment(films, SHIFT, seed=12))


def test_older_presets_draw_the_same_random_numbers():
    """The shipped members' recipes stay reproducible: no extra draws unless the shift part is on."""
    params = draw_params(np.random.default_rng(5), 8, SIZE, STRONG)
    assert "overlay" not in params
    again = draw_params(np.random.default_rng(5), 8, SIZE, STRONG)
    np.testing.assert_array_equal(params["transform"], again["transform"])


def test_markers_are_burned_in_near_the_edges_only(films):
    out = _augment(films, replace(OFF, marker_probability=1.0))
    changed = np.abs(out - films) > 1e-3
    assert changed.reshape(len(films), -1).any(axis=1).all()  # every film got a marker
    np.testing.assert_allclose(_centre(out, 0.27), _centre(films, 0.27), atol=1e-4)  # lungs untouched
    assert changed.mean() < 0.1  # small, like a side marker or a line of text


def test_collimation_bands_cover_whole_edges(films):
    out = _augment(films, replace(OFF, border_mask_probability=1.0))
    for image, film in zip(out, films, strict=True):
        edges = [image[0], image[-1], image[:, 0], image[:, -1]]
        flat = [e for e in edges if np.ptp(e) < 1e-6 and (e[0] < 1e-6 or e[0] >= 0.85)]
        assert flat, "no edge covered by a black or white band"
        np.testing.assert_allclose(_centre(image[None], 0.15)[0], _centre(film[None], 0.15)[0], atol=1e-4)


def test_resolution_loss_removes_fine_detail_and_keeps_brightness(films):
    out = _augment(films, replace(OFF, blur_probability=1.0))

    def detail(images: np.ndarray) -> float:
        return float(np.abs(np.diff(images, axis=2)).mean() + np.abs(np.diff(images, axis=1)).mean())

    assert detail(out) < 0.8 * detail(films)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), films.mean(axis=(1, 2)), atol=0.01)


def test_contrast_curve_is_monotone_and_changes_contrast(films):
    out = _augment(films, replace(OFF, curve_probability=1.0))
    for image, film in zip(out, films, strict=True):
        order = np.argsort(film.ravel(), kind="stable")
        assert np.all(np.diff(image.ravel()[order]) >= -1e-5)  # a grey-level curve keeps the order
        assert np.abs(image - film).mean() > 0.01


@pytest.mark.parametrize(
    ("name", "kept"), [("markers", "marker_probability"), ("bands", "border_mask_probability")]
)
def test_ablation_presets_are_strong_plus_one_part_of_shift(films, name, kept):
    """'markers' and 'bands' each keep one part of 'shift' on top of 'strong', at the same rate."""
    preset = PRESETS[name]
    parts = ("marker_probability", "border_mask_probability", "blur_probability", "curve_probability")
    assert {part: getattr(preset, part) for part in parts} == {
        part: getattr(SHIFT, part) if part == kept else 0.0 for part in parts
    }
    assert replace(preset, **{kept: 0.0}) == STRONG
    params = draw_params(np.random.default_rng(3), len(films), SIZE, preset)
    assert params["blur"].max() == 0 and params["curve"].max() == 0
    covered = params["alpha"].reshape(len(films), -1).mean(axis=1)
    assert (covered > 0).any() and covered.max() < 0.6  # near the edges, never the whole film
