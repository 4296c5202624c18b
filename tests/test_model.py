"""Fast checks of the shipped model, its metadata, the training preprocessing and the split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from models import data, default_model_dir
from models.metrics import operating_point, operating_thresholds, roc_auc
from pipeline.normalise import resize_square, to_model_input
from tests.conftest import KERMANY as TRAIN_DIR  # the full training set: extended tests only


@pytest.fixture(scope="module")
def metadata() -> dict:
    return json.loads((default_model_dir() / "metadata.json").read_text())


@pytest.fixture(scope="module")
def scorer():
    from pipeline.inference import Scorer

    return Scorer.load(default_model_dir(), engine="tensorflow")  # the Keras model itself


def test_metadata_is_consistent(metadata: dict) -> None:
    model_file = default_model_dir() / metadata["model_file"]
    assert model_file.is_file()
    assert model_file.stat().st_size < 20 * 1024 * 1024
    assert metadata["version"].startswith(f"cxr-pneumonia-{metadata['architecture']}-")
    assert metadata["output_names"] == ["pneumonia", "viral"]
    assert metadata["temperature"] > 0
    assert 0 < metadata["screening_threshold"] < metadata["high_confidence_threshold"] < 1
    assert isinstance(metadata["seed"], int)
    split = Path(__file__).resolve().parents[1] / metadata["split_file"]
    assert split.is_file()
    assert (default_model_dir() / "MODEL_CARD.md").is_file()


@pytest.mark.train
def test_scorer_loads_with_metadata(scorer, metadata: dict) -> None:
    assert scorer.version == metadata["version"]
    assert scorer.input_size == metadata["input_size"]
    assert scorer.temperature == pytest.approx(metadata["temperature"])
    scores = scorer.score_batch(np.zeros((2, scorer.input_size, scorer.input_size, 1), np.float32))
    assert len(scores) == 2
    for score in scores:
        assert 0.0 <= score.pneumonia_probability <= 1.0
        assert score.viral_probability is not None and 0.0 <= score.viral_probability <= 1.0
        expected = 1 / (1 + np.exp(-score.pneumonia_logit / scorer.temperature))
        assert score.pneumonia_probability == pytest.approx(expected, abs=1e-6)


def test_importing_inference_does_not_import_tensorflow() -> None:
    import subprocess
    import sys

    code = "import sys, pipeline.inference; print('tensorflow' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.train
def test_training_preprocessing_equals_serving(metadata: dict) -> None:
    from models.augment import standardise_tf

    rng = np.random.default_rng(0)
    size = metadata["input_size"]
    greys = [rng.random((224, 224)).astype(np.float32), np.full((300, 260), 0.3, np.float32)]
    greys.append(np.clip(rng.normal(0.5, 0.2, (180, 240)), 0, 1).astype(np.float32))
    for grey in greys:
        cached = resize_square(grey, size)  # what models.data caches
        training = np.asarray(standardise_tf(cached[np.newaxis]))[0]
        np.testing.assert_allclose(training, to_model_input(grey, size), atol=1e-4)


@pytest.mark.train
def test_augmentation_is_seeded_and_in_range() -> None:
    from models.augment import AugmentConfig, augment_tf, draw_params

    grey = np.random.default_rng(1).random((4, 64, 64)).astype(np.float32)
    first = augment_tf(grey, draw_params(np.random.default_rng(7), 4, 64, AugmentConfig()))
    second = augment_tf(grey, draw_params(np.random.default_rng(7), 4, 64, AugmentConfig()))
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))
    assert float(np.min(first)) >= 0.0 and float(np.max(first)) <= 1.0


def test_patient_key_parsing() -> None:
    assert data.patient_key("person1000_bacteria_2931.jpeg") == "person1000"
    assert data.patient_key("person1000_virus_1681.jpeg") == "person1000"
    assert data.patient_key("IM-0115-0001.jpeg") == "normal-115"
    assert data.patient_key("NORMAL2-IM-0115-0001.jpeg") == "normal-115"


@pytest.mark.extended
def test_split_has_no_patient_on_both_sides() -> None:
    samples = data.list_samples(TRAIN_DIR)
    val_patients = data.read_split()
    train, val = data.partition(samples, val_patients)
    assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
    assert 0.15 <= len(val) / len(samples) <= 0.20
    assert {s.pneumonia for s in val} == {0, 1}


@pytest.mark.extended
def test_duplicates_do_not_straddle_the_split() -> None:
    import hashlib
    from collections import defaultdict

    val_patients = data.read_split()
    sides: dict[str, set[bool]] = defaultdict(set)
    for sample in data.list_samples(TRAIN_DIR):
        sides[hashlib.sha256(sample.path.read_bytes()).hexdigest()].add(sample.patient in val_patients)
    assert all(len(side) == 1 for side in sides.values())


@pytest.mark.extended
def test_split_is_reproducible() -> None:
    samples = data.list_samples(TRAIN_DIR)
    assert data.make_split(samples, seed=20240) == data.read_split()


def _pick(root: Path, folder: str, count: int) -> list[Path]:
    files = sorted((root / folder).glob("*.jpeg"))
    return files[:: max(1, len(files) // count)][:count]


@pytest.mark.train
def test_real_images_score_in_range_and_rank(scorer, kermany) -> None:
    normal = scorer.score_files(_pick(kermany, "NORMAL", 10))
    pneumonia = scorer.score_files(_pick(kermany, "PNEUMONIA", 10))
    for score in normal + pneumonia:
        assert 0.0 <= score.pneumonia_probability <= 1.0
    mean_p = np.mean([s.pneumonia_probability for s in pneumonia])
    mean_n = np.mean([s.pneumonia_probability for s in normal])
    assert mean_p > mean_n


@pytest.mark.train
def test_batch_size_does_not_change_scores(scorer) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((9, scorer.input_size, scorer.input_size, 1)).astype(np.float32)
    together = [s.pneumonia_logit for s in scorer.score_batch(x)]
    alone = [scorer.score_batch(x[i : i + 1])[0].pneumonia_logit for i in range(len(x))]
    np.testing.assert_allclose(together, alone, atol=1e-3)


@pytest.mark.train
def test_gradcam_heatmap_shape(tmp_path: Path) -> None:
    from models.explain import gradcam, write_overlay

    grey = np.clip(np.random.default_rng(2).normal(0.5, 0.2, (200, 180)), 0, 1).astype(np.float32)
    heatmap = gradcam(None, grey)
    assert heatmap.shape == grey.shape
    assert heatmap.dtype == np.float32
    assert float(heatmap.min()) >= 0.0 and float(heatmap.max()) <= 1.0
    out = tmp_path / "overlay.png"
    write_overlay(grey, heatmap, out)
    assert out.stat().st_size > 0


@pytest.mark.train
def test_member_gradcam_maps_average_to_the_ensemble_map(kermany) -> None:
    """The per-member maps (used to compare a member with a separately trained variant) are the
    parts of the ensemble's map."""
    from models.explain import _cam_models, gradcam, member_gradcam
    from pipeline.decode import decode_file

    grey = decode_file(sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[0]).pixels
    members = len(_cam_models(str(default_model_dir().resolve()))[0])
    maps = [member_gradcam(None, grey, i) for i in range(members)]
    mean = np.mean(maps, axis=0)
    expected = mean / mean.max()
    np.testing.assert_allclose(gradcam(None, grey), expected, atol=1e-5)


def test_metrics_helpers() -> None:
    y = np.array([0, 0, 0, 1, 1, 1])
    assert roc_auc(y, np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])) == 1.0
    assert roc_auc(y, np.array([0.5] * 6)) == 0.5
    prob = np.linspace(0.01, 0.99, 200)
    labels = (prob > 0.5).astype(int)
    screening, high = operating_thresholds(labels, prob)
    assert operating_point(labels, prob, screening).sensitivity >= 0.98
    assert operating_point(labels, prob, high).specificity >= 0.95


@pytest.mark.train
def test_ensemble_members_match_metadata(scorer, metadata: dict) -> None:
    import keras

    members = [layer for layer in scorer._model.layers if isinstance(layer, keras.Model)]
    assert len(members) == len(metadata.get("members", []))
    for layer, member in zip(members, metadata.get("members", []), strict=True):
        assert member["architecture"] in layer.name


@pytest.mark.train
@pytest.mark.extended  # the full training set
def test_unpacked_members_rebuild_the_shipped_ensemble(tmp_path: Path) -> None:
    """``model unpack`` gives run folders from which ``model ensemble`` rebuilds the shipped model: same
    validation logits, same calibration (so one member can be swapped without retraining the others)."""
    from models.ensemble import build_and_export, unpack
    from worker.cli.model_commands import _cache_dir

    cache = _cache_dir(None)  # the CLI's training cache: the films are not decoded again
    shipped = default_model_dir()
    folders = unpack(shipped, tmp_path / "runs", TRAIN_DIR, cache)
    meta = json.loads((shipped / "metadata.json").read_text())
    assert [f.name for f in folders] == ["resnet128strong", "mobilenet128", "baseline128strong"]
    for folder, record in zip(folders, meta["members"], strict=True):
        member = json.loads((folder / "metadata.json").read_text())
        assert member["version"] == record["version"] and member["unpacked_from"] == meta["version"]
    rebuilt = build_and_export(folders, tmp_path / "rebuilt", TRAIN_DIR, cache)
    assert rebuilt["temperature"] == meta["temperature"]
    assert rebuilt["validation"] == meta["validation"]
    assert rebuilt["screening_threshold"] == meta["screening_threshold"]
    assert rebuilt["high_confidence_threshold"] == meta["high_confidence_threshold"]


@pytest.mark.train
def test_attention_command_measures_the_validation_films_by_class() -> None:
    """``model attention`` (the model card's Grad-CAM table) on the bundled sample's validation films."""
    import re
    import subprocess

    from tests.conftest import CLI, KERMANY_SAMPLE, REPO

    shown = subprocess.run(
        [CLI, "model", "attention", str(default_model_dir()), "--data-dir", str(KERMANY_SAMPLE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
    ).stdout
    area, row = shown.splitlines()[2:4]
    assert area.startswith("| area share (uniform map) | | 0.56 | 0.36 |")
    normal, pneumonia = (int(n) for n in re.search(r"\| (\d+) / (\d+) \|", row).groups())
    validation = data.partition(data.list_samples(KERMANY_SAMPLE), data.read_split())[1]
    assert 0 < normal <= sum(s.pneumonia == 0 for s in validation)
    assert 0 < pneumonia <= sum(s.pneumonia == 1 for s in validation)
    shares = [float(x) for x in re.findall(r"\d\.\d{3}", row)]
    assert len(shares) == 12 and all(0.0 <= x <= 1.0 for x in shares)
