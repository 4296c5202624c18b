"""Drawing without a plotting library: the numpy jet table and the ROC png drawn by Pillow."""

import numpy as np
import pytest

from pipeline.colours import jet, jet_table


def test_jet_is_matplotlibs_jet():
    colormaps = pytest.importorskip("matplotlib").colormaps
    values = np.concatenate([np.random.default_rng(0).random(5000), [0.0, 0.5, 1.0, 1 - 1e-12, -0.2, 1.3]])
    expected = colormaps["jet"](np.clip(values, 0.0, 1.0))[..., :3]
    assert np.abs(jet(values) - expected).max() < 1e-9


def test_jet_table_shape_and_ends():
    table = jet_table()
    assert table.shape == (256, 3)
    assert np.allclose(table[0], [0.0, 0.0, 0.5]) and np.allclose(table[-1], [0.5, 0.0, 0.0])
    assert jet(np.zeros((2, 3))).shape == (2, 3, 3)


def test_roc_png_is_drawn_without_matplotlib(tmp_path, monkeypatch):
    """`model evaluate --roc-png` works in the serving install (no matplotlib there)."""
    from PIL import Image

    from models.evaluate import EvaluationReport, write_roc_png
    from models.metrics import operating_point, roc_auc

    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # import matplotlib -> ImportError
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.5
    prob = np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1)
    report = EvaluationReport(
        "model-x", 200, int(y.sum()), roc_auc(y, prob), None,
        operating_point(y, prob, 0.3), operating_point(y, prob, 0.7),
    )  # fmt: skip
    write_roc_png(y, prob, report, tmp_path / "roc.png")
    pixels = np.asarray(Image.open(tmp_path / "roc.png").convert("RGB"))
    assert pixels.shape == (500, 500, 3)
    curve = np.all(pixels == (31, 119, 180), axis=-1)
    assert curve[:, 60:250].any() and curve[:, 300:480].any()  # the curve spans the plot
