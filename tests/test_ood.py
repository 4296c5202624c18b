"""The out-of-distribution guard: is this a frontal chest film at all?"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from pipeline.ood import (
    OOD_FILE,
    ORIENTATION_REASON,
    REASON,
    OodGuard,
    OrientationCheck,
    fit_guard,
    fit_logistic,
    fit_orientation,
)
from tests.conftest import CLI

NON_CHEST_CR = "fo-dicom-testdata__dcmfx/CR-ModalitySequenceLUT.dcm"  # a knee-like CR, scored 0.72 before


# -- the density model ----------------------------------------------------------------------------
def _clouds(seed: int = 0, dims: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scales = np.linspace(3.0, 0.1, dims)
    train = rng.normal(size=(2000, dims)) * scales
    labels = (rng.random(2000) < 0.5).astype(int)
    train[labels == 1, 0] += 4.0
    val = rng.normal(size=(500, dims)) * scales
    return train, labels, val


def test_cut_off_keeps_the_validation_quantile_and_flags_far_points():
    train, labels, val = _clouds()
    guard = fit_guard(train, labels, val, keep=0.995, margin=1.0, rank=39, shrinkage=0.01)
    assert np.mean(~guard.flags(val)) >= 0.995
    far = val[:20].copy()
    far[:, -1] += 5.0  # along a direction of tiny variance: far in Mahalanobis terms, near in Euclidean
    assert guard.flags(far).all()
    wider = fit_guard(train, labels, val, keep=0.995, margin=1.25, rank=39, shrinkage=0.01)
    assert wider.cutoff == pytest.approx(1.25 * guard.cutoff)


def test_low_rank_storage_matches_the_full_precision_and_round_trips(tmp_path):
    train, labels, val = _clouds(seed=1)
    full = fit_guard(train, labels, val, rank=39)
    low = fit_guard(train, labels, val, rank=20)  # trailing directions share one (shrunk) variance
    assert np.corrcoef(full.distances(val), low.distances(val))[0, 1] > 0.98
    low.save(tmp_path / OOD_FILE)
    loaded = OodGuard.for_model_dir(tmp_path)
    np.testing.assert_allclose(loaded.distances(val), low.distances(val), rtol=1e-5)
    assert loaded.cutoff == pytest.approx(low.cutoff) and loaded.info == low.info
    assert OodGuard.for_model_dir(tmp_path / "nothing") is None


def test_orientation_check_keeps_the_validation_quantile_and_round_trips(tmp_path):
    """Upright vs turned clouds that differ along one low-variance direction only."""
    train, labels, val = _clouds(seed=2)
    turned = train.copy()
    turned[:, -2] += 1.0  # variance there is about 0.01: far for the classifier, near in Euclidean terms
    check, info = fit_orientation(train, turned, val, keep=0.995)
    assert np.mean(~check.flags(val)) >= 0.995 and info["orientation_val_kept"] >= 0.995
    val_turned = val.copy()
    val_turned[:, -2] += 1.0
    assert check.flags(val_turned).mean() >= 0.95
    guard = fit_guard(train, labels, val)
    assert guard.orientation is None
    guard.save(tmp_path / OOD_FILE)
    assert OodGuard.for_model_dir(tmp_path).orientation is None  # an older ood.npz: no orientation check
    guard.orientation = check
    guard.save(tmp_path / OOD_FILE)
    loaded = OodGuard.for_model_dir(tmp_path)
    np.testing.assert_allclose(
        loaded.orientation.logits(val_turned), check.logits(val_turned), rtol=1e-4, atol=1e-4
    )
    assert loaded.flags(val_turned).mean() >= 0.95 and loaded.flags(val).mean() <= 0.01


def test_logistic_fit_separates_and_reasons_have_a_precedence():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 3))
    y = (x[:, 0] + 0.1 * rng.normal(size=400) > 0).astype(float)
    w, b = fit_logistic(x, y, l2=0.01)
    assert ((x @ w + b > 0) == (y > 0.5)).mean() > 0.95 and w[0] > 5 * abs(w[1])
    guard = OodGuard(np.zeros((1, 3)), np.eye(3)[:, :2], np.ones(2), 1.0, 5.0, {})
    guard.orientation = OrientationCheck(np.zeros(3), 0.0, cutoff=1.0)
    assert guard.reason(distance=9.0, orientation_logit=3.0) == REASON  # not a chest film first
    assert guard.reason(distance=1.0, orientation_logit=3.0) == ORIENTATION_REASON
    assert guard.reason(distance=1.0, orientation_logit=0.5) is None


# -- the shipped guard ----------------------------------------------------------------------------
@pytest.mark.train  # features=False: the Keras model without the guard
def test_shipped_guard_is_loaded_and_leaves_the_scores_unchanged(scorer, model_dir, kermany):
    from pipeline.decode import decode_file
    from pipeline.inference import Scorer

    assert scorer.ood is not None and scorer.ood.info["val_kept"] >= 0.995
    assert (model_dir / OOD_FILE).stat().st_size < 2_000_000
    plain = Scorer.load(model_dir, features=False)
    files = (
        sorted((kermany / "NORMAL").glob("*.jpeg"))[:4] + sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[:4]
    )
    x = np.stack([scorer.model_input(decode_file(f).pixels)[0] for f in files])
    guarded, unguarded = scorer.score_batch(x), plain.score_batch(x)
    for a, b in zip(guarded, unguarded, strict=True):
        assert a.pneumonia_probability == pytest.approx(b.pneumonia_probability, abs=1e-6)
        assert a.ood_distance is not None and b.ood_distance is None
        assert not a.out_of_distribution and a.ood_reason is None


def test_upright_films_pass_and_turned_films_are_flagged(scorer, kermany):
    """Real films: upright ones pass; turned 180 degrees or upside down they are rejected as turned."""
    from pipeline.decode import decode_file

    assert scorer.ood.orientation is not None
    files = (
        sorted((kermany / "NORMAL").glob("*.jpeg"))[:6] + sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[:6]
    )
    greys = [decode_file(f).pixels for f in files]
    upright = scorer.score_batch(np.stack([scorer.model_input(g)[0] for g in greys]))
    assert not any(s.out_of_distribution for s in upright)
    for turn in (lambda g: np.rot90(g, 2), lambda g: g[::-1]):
        turned = scorer.score_batch(
            np.stack([scorer.model_input(np.ascontiguousarray(turn(g)))[0] for g in greys])
        )
        assert sum(s.ood_reason == ORIENTATION_REASON for s in turned) >= 10, [s.ood_reason for s in turned]


@pytest.mark.train
@pytest.mark.extended  # real files of ../shared/data/dicom with no stand-in in a bare clone
def test_battery_rejection_rates(scorer, kermany, dicom_dir):
    """Non-chest DICOMs (forced past the header checks), natural and synthetic images, inverted and
    rotated chest films are rejected; validation chest films, also mildly perturbed, are kept."""
    from models import data
    from models.ood_fit import battery, run_battery

    _, val = data.partition(data.list_samples(kermany), data.read_split())
    films = [s.path for s in val[::23]]  # about 40 validation films, both classes
    rates = run_battery(scorer, battery(dicom_dir, films)).rates()
    print("\n" + json.dumps({k: v["rejection_rate"] for k, v in rates.items()}, indent=1))
    rejected = {k: v["rejection_rate"] for k, v in rates.items()}
    assert rejected["dicom-non-chest"] >= 0.85
    assert rejected["natural"] >= 0.8 and rejected["synthetic"] >= 0.8
    assert rejected["chest-inverted"] >= 0.85
    assert rejected["chest-rotated-90"] >= 0.85 and rejected["chest-rotated-270"] >= 0.85
    # turned 180 degrees or upside down: the density keeps them, the orientation check does not
    assert rejected["chest-rotated-180"] >= 0.85 and rejected["chest-upside-down"] >= 0.85
    assert rejected["chest-kept-none"] == 0.0
    for name in ("gamma_0.6", "gamma_1.6", "blur_1/3", "jpeg_q20", "hist_equalise", "crop_80%"):
        assert rejected[f"chest-kept-{name}"] <= 0.05, name
    assert rates["dicom-chest"]["rejected"] <= 1  # real adult chest films from other sources are kept


@pytest.mark.extended  # real files of ../shared/data/dicom with no stand-in in a bare clone
def test_scan_rejects_what_is_not_a_chest_film(kermany, dicom_dir, tmp_path):
    from PIL import Image

    drop = tmp_path / "drop"
    drop.mkdir()
    shutil.copyfile(dicom_dir / NON_CHEST_CR, drop / "cr.dcm")
    film = sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[5]
    Image.open(film).convert("L").rotate(180).save(drop / "turned.png")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8), mode="L").save(drop / "noise.png")
    stripes = (127 + 127 * np.sin(np.arange(256) / 3.0))[None, :].repeat(256, 0).astype(np.uint8)
    Image.fromarray(stripes, mode="L").save(drop / "stripes.png")
    chest = (
        sorted((kermany / "NORMAL").glob("*.jpeg"))[:2] + sorted((kermany / "PNEUMONIA").glob("*.jpeg"))[:2]
    )
    for path in chest:
        shutil.copyfile(path, drop / path.name)
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    scan = subprocess.run(
        [CLI, "scan", str(drop), "--database-url", url, "--no-progress", "--decode-workers", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert scan.returncode == 0, scan.stderr[-2000:]
    rows = json.loads(
        subprocess.run(
            [CLI, "worklist", "--format", "json", "--database-url", url], capture_output=True, text=True
        ).stdout
    )
    by_name = {Path(r["path"]).name: r for r in rows}
    for name in ("cr.dcm", "noise.png", "stripes.png"):
        assert by_name[name]["status"] == "rejected" and by_name[name]["reason"] == REASON, name
        assert by_name[name]["score"] is None
    assert by_name["turned.png"]["status"] == "rejected"
    assert by_name["turned.png"]["reason"] == ORIENTATION_REASON and by_name["turned.png"]["score"] is None
    for path in chest:
        assert by_name[path.name]["status"] == "scored"


@pytest.mark.train
def test_fit_ood_command_writes_a_guard_with_an_orientation_check(model_dir, tmp_path):
    """The documented refit command runs end to end (it failed on an import before) on the small sample."""
    from tests.conftest import REPO

    copy = tmp_path / "model"
    copy.mkdir()
    for name in ("model.keras", "metadata.json"):
        shutil.copyfile(model_dir / name, copy / name)
    other = tmp_path / "other-chest"  # stands in for another population's upright chest films
    other.mkdir()
    for film in sorted((REPO / "tests" / "data" / "kermany" / "NORMAL").iterdir())[:3]:
        shutil.copyfile(film, other / film.name)
    fit = subprocess.run(
        [CLI, "model", "fit-ood", str(REPO / "tests" / "data" / "kermany"), "--model-dir", str(copy)]
        + ["--battery-films", "2", "--other-chest", str(other)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-2000:]
    guard = OodGuard.for_model_dir(copy)
    assert guard is not None and guard.orientation is not None
    assert guard.info["val_kept"] >= 0.995 and guard.info["orientation_val_kept"] >= 0.995
    assert guard.info["other_chest_films"] == 3 and len(guard.means) == 3  # normal, pneumonia, other
    assert "chest-rotated-180" in fit.stdout
