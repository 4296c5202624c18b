"""Class activation maps from the serving graph (issue 27): the ``cam`` output of the shipped export is
the CAM of the ensemble's global-pooled members (feature maps weighted by the pneumonia head, no
gradients), the same under LiteRT and TensorFlow; it is laid on the film through the crop box; and
``cxr-triage explain`` draws it without importing TensorFlow or matplotlib."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from pipeline.cam import COLOURS, place_on_film
from pipeline.decode import decode_file
from pipeline.normalise import to_model_input
from tests.conftest import kermany_files


@pytest.fixture(scope="module")
def films(kermany) -> np.ndarray:
    files = kermany_files(kermany, "NORMAL", 3) + kermany_files(kermany, "PNEUMONIA", 3)
    return np.stack([to_model_input(decode_file(path).pixels, 128) for path in files])


def _reference_cam(model_dir, films: np.ndarray) -> np.ndarray:
    """The CAM by its definition, from the Keras members' own layers (numpy, no serving graph)."""
    import keras

    from pipeline.inference import load_keras_model

    model, _ = load_keras_model(model_dir)
    maps = []
    for member in [layer for layer in model.layers if isinstance(layer, keras.Model)]:
        if "gap" not in [layer.name for layer in member.layers]:
            continue  # the flatten member has no class activation map
        head = member.get_layer("pneumonia")
        grid = member.get_layer("gap").input
        sub = keras.Model(member.inputs, [grid, head.output])
        features, logit = (np.asarray(t) for t in sub(films, training=False))
        kernel, bias = (np.asarray(w) for w in head.get_weights())
        contribution = features @ kernel[:, 0]  # (N, h, w): each cell's share of the logit
        # what makes it a CAM: the cells' mean contribution plus the bias is the member's logit
        np.testing.assert_allclose(contribution.mean(axis=(1, 2)) + bias[0], logit[:, 0], atol=1e-3)
        cam = np.maximum(contribution, 0)
        maps.append(cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-3))
    assert len(maps) == 2, "the shipped ensemble has two global-pooled members"
    mean = np.mean(maps, axis=0)
    return mean / np.maximum(mean.max(axis=(1, 2), keepdims=True), 1e-3)


def test_the_served_cam_is_the_class_activation_map_under_both_engines(model_dir, films):
    from pipeline.inference import Scorer

    lite = Scorer.load(model_dir, engine="litert")
    served = lite.cam(films)
    assert (
        served.shape == (len(films), 4, 4) and served.min() >= 0 and np.allclose(served.max(axis=(1, 2)), 1)
    )
    expected = _reference_cam(model_dir, films)
    np.testing.assert_allclose(served, expected, atol=2e-3)
    tensorflow = Scorer.load(model_dir, engine="tensorflow", features=True)
    np.testing.assert_allclose(tensorflow.cam(films), expected, atol=2e-3)


def test_a_scorer_without_the_cam_output_says_so(model_dir, films):
    from pipeline.inference import Scorer

    plain = Scorer.load(model_dir, engine="tensorflow", features=False)
    with pytest.raises(ValueError, match="no class activation maps"):
        plain.cam(films[:1])


def test_the_map_lands_in_the_crop_box_on_the_film():
    film = place_on_film(np.ones((4, 4), np.float32), (0.25, 0.5, 0.75, 1.0), (100, 200))
    assert film.shape == (100, 200)
    assert film[25:75, 100:200].min() == 1.0
    assert film.sum() == 50 * 100, "nothing outside the box"
    whole = place_on_film(np.eye(4, dtype=np.float32), (0.0, 0.0, 1.0, 1.0), (80, 40))
    assert whole[0, 0] > 0.5 and whole[-1, 0] < 0.1 and whole[-1, -1] > 0.5, "the whole film: corners kept"


def test_the_colour_table_runs_from_cold_to_hot():
    assert COLOURS.shape == (256, 3) and COLOURS.dtype == np.uint8
    cold, hot = COLOURS[:64].astype(int), COLOURS[-64:].astype(int)
    assert cold[:, 2].mean() > cold[:, 0].mean() and hot[:, 0].mean() > hot[:, 2].mean()


def test_explain_draws_the_map_without_tensorflow_in_two_seconds(kermany, model_dir, tmp_path):
    film = kermany_files(kermany, "PNEUMONIA", 1)[0]
    out = tmp_path / "heat.png"
    probe = (
        "import sys, time\n"
        "from worker.cli.entry import main\n"
        f"sys.argv = ['cxr-triage', 'explain', {str(film)!r}, '-o', {str(out)!r}, "
        f"'--model-dir', {str(model_dir)!r}]\n"
        "started = time.process_time()\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('cpu', time.process_time() - started)\n"
        "print('tensorflow' in sys.modules, 'matplotlib' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "False False", "no TensorFlow, no matplotlib"
    assert float(lines[-2].split()[1]) <= 2.0, lines[-2]
    assert "research visualisation, not a diagnosis" in lines[0]
    from PIL import Image

    with Image.open(out) as picture:
        width, height = Image.open(film).size
        assert picture.width == width and picture.height > height, "the film at its size, the scale below"
