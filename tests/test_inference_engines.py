"""Issue 13: LiteRT serves the shipped model on CPU without importing TensorFlow, with the scores and
out-of-distribution decisions of the Keras model; an export that no longer matches its model folder
is never used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pipeline.decode import decode_file
from pipeline.inference import Scorer
from pipeline.model_folder import LITE_SIDECAR_FILE, Engine, resolve_engine
from pipeline.normalise import to_model_input
from tests.conftest import CLI, kermany_files


@pytest.fixture(scope="module")
def films(kermany) -> np.ndarray:
    files = kermany_files(kermany, "NORMAL", 8) + kermany_files(kermany, "PNEUMONIA", 8)
    return np.stack([to_model_input(decode_file(path).pixels, 128) for path in files])


def test_the_shipped_model_is_served_by_litert_without_tensorflow(model_dir):
    probe = (
        "import sys; from pipeline.inference import Scorer; "
        f"s = Scorer.load({str(model_dir)!r}); "
        "print(s.engine, 'tensorflow' in sys.modules, 'keras' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["litert", "False", "False"], done.stderr[-2000:]


@pytest.mark.train
def test_litert_and_tensorflow_give_the_same_scores_and_decisions(model_dir, films):
    lite = Scorer.load(model_dir)
    keras = Scorer.load(model_dir, engine=Engine.TENSORFLOW)
    assert (lite.engine, keras.engine) == (Engine.LITERT, Engine.TENSORFLOW)
    for a, b in zip(lite.score_batch(films), keras.score_batch(films), strict=True):
        assert abs(a.pneumonia_probability - b.pneumonia_probability) < 1e-4
        assert abs(a.viral_probability - b.viral_probability) < 1e-4
        assert abs(a.ood_distance - b.ood_distance) < 1e-2
        assert (a.out_of_distribution, a.ood_reason) == (b.out_of_distribution, b.ood_reason)
    one = lite.score_batch(films[:1])[0]  # a batch of another size resizes the interpreter's buffers
    again = lite.score_batch(films)[0]
    assert one.pneumonia_probability == pytest.approx(again.pneumonia_probability, abs=1e-6)
    np.testing.assert_allclose(lite.features(films), keras.features(films), atol=1e-3)


def test_an_export_that_does_not_match_its_model_folder_is_not_used(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    sidecar = json.loads((copy / LITE_SIDECAR_FILE).read_text())
    sidecar["sources_sha256"] = "0" * 64  # as after `model fit-ood` or a new model.keras
    (copy / LITE_SIDECAR_FILE).write_text(json.dumps(sidecar))
    assert resolve_engine(copy) is Engine.TENSORFLOW
    with pytest.raises(RuntimeError, match="export-lite"):
        resolve_engine(copy, Engine.LITERT)


@pytest.mark.train
def test_export_lite_writes_an_export_that_serves_like_the_shipped_one(model_dir, films, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    for name in ("model.tflite", LITE_SIDECAR_FILE):
        (copy / name).unlink()
    assert resolve_engine(copy) is Engine.TENSORFLOW
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [CLI, "model", "export-lite", "--model-dir", str(copy)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert resolve_engine(copy) is Engine.LITERT
    fresh = [s.pneumonia_probability for s in Scorer.load(copy).score_batch(films)]
    shipped = [s.pneumonia_probability for s in Scorer.load(model_dir).score_batch(films)]
    np.testing.assert_allclose(fresh, shipped, atol=1e-6)


@pytest.mark.train
def test_an_export_made_before_the_guard_still_gives_features_for_fitting_one(model_dir, films, tmp_path):
    """`fit-ood` on a freshly exported folder (no ood.npz yet, so an export without features) failed with
    "loaded without features"; TensorFlow now computes them."""
    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("model.keras", "metadata.json"):
        shutil.copyfile(model_dir / name, copy / name)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [CLI, "model", "export-lite", "--model-dir", str(copy)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "features" not in json.loads((copy / LITE_SIDECAR_FILE).read_text())["outputs"].values()
    scorer = Scorer.load(copy, features=True)
    assert scorer.engine is Engine.TENSORFLOW and scorer.features(films).shape[0] == len(films)
    assert Scorer.load(copy).engine is Engine.LITERT  # scoring alone still uses the export
