"""Lung fields (pipeline.lungs) and the shift check's pieces (models.external)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from models.external import patient_bootstrap_auc, wilson, with_border
from pipeline.lungs import (
    NO_LUNG_FIELDS,
    InputPlan,
    LungFields,
    crop_box,
    crop_to_lungs,
    lung_fields,
    suppress_outside_lungs,
)


def _two_lungs(size: int = 128) -> np.ndarray:
    """A probability map with one lung field either side of the midline."""
    prob = np.zeros((size, size), np.float32)
    prob[30:100, 20:55] = 0.9
    prob[30:100, 73:108] = 0.9
    return prob


def test_two_lung_fields_give_their_box_area_and_centroid():
    fields = lung_fields(_two_lungs())
    assert fields.two_fields and fields.problem() is None
    top, left, bottom, right = fields.box
    assert (top, left, bottom, right) == pytest.approx((30 / 128, 20 / 128, 100 / 128, 108 / 128))
    assert fields.area == pytest.approx(2 * 70 * 35 / 128**2)
    assert fields.centroid[0] == pytest.approx(65 / 128, abs=0.01)


def test_one_lung_field_or_none_is_not_a_frontal_chest_film():
    one = _two_lungs()
    one[:, 64:] = 0
    assert lung_fields(one).problem() == NO_LUNG_FIELDS
    empty = lung_fields(np.zeros((128, 128), np.float32))
    assert empty.box is None and empty.problem() == NO_LUNG_FIELDS
    assert crop_box(empty) == (0.0, 0.0, 1.0, 1.0)


def test_lungs_of_an_implausible_size_or_place_are_not_lungs():
    small = np.zeros((128, 128), np.float32)
    small[60:70, 50:60] = small[60:70, 68:78] = 0.9  # two specks: 1 % of the film
    assert lung_fields(small).problem() == NO_LUNG_FIELDS
    low = np.zeros((128, 128), np.float32)
    low[100:128, 20:55] = low[100:128, 73:108] = 0.9  # both "fields" at the bottom edge
    assert lung_fields(low).two_fields and lung_fields(low).problem() == NO_LUNG_FIELDS
    everything = np.full((128, 128), 0.9, np.float32)  # the whole picture "is lung"
    assert lung_fields(everything).problem() == NO_LUNG_FIELDS


def test_specks_do_not_stretch_the_box():
    prob = _two_lungs()
    prob[2, 2] = prob[125, 126] = 1.0  # single stray pixels
    assert lung_fields(prob).box == lung_fields(_two_lungs()).box


def test_suppression_keeps_the_lungs_and_greys_out_the_rest_at_any_resolution():
    film = np.linspace(0, 1, 512 * 384, dtype=np.float32).reshape(512, 384)
    film[:, :40] = 1.0  # a bright arm / marker at the film's edge
    out = suppress_outside_lungs(film, _two_lungs(), dilation=2)
    assert out.shape == film.shape and out.dtype == film.dtype
    inside = (slice(160, 360), slice(75, 150))  # inside the left field (map rows 30-100, cols 20-55)
    assert np.array_equal(out[inside], film[inside])  # the lung field itself is untouched
    edge = out[:, :40]
    assert np.ptp(edge) == 0 and 0.2 < edge[0, 0] < 0.9  # the edge is one grey: the lungs' median
    assert np.array_equal(suppress_outside_lungs(film, np.zeros((128, 128), np.float32)), film)


def test_a_model_folders_plan_says_whether_it_suppresses():
    crop = {"kind": "lungs", "lung_model": "lungs.tflite"}
    assert InputPlan.from_metadata("m", {"input_size": 160, "crop": crop}) == InputPlan(160, "m/lungs.tflite")
    masked = InputPlan.from_metadata("m", {"input_size": 160, "crop": {**crop, "suppress": True}})
    assert masked.suppress and masked.decode_side == 320
    assert InputPlan.from_metadata("m", {"input_size": 128}) == InputPlan(128)


def test_crop_box_adds_the_margin_and_stays_on_the_film():
    fields = LungFields(box=(0.2, 0.0, 0.8, 0.5), area=0.3, sides=(0.2, 0.1), centroid=(0.5, 0.25))
    top, left, bottom, right = crop_box(fields, margin=0.1)
    assert (top, left, bottom, right) == pytest.approx((0.14, 0.0, 0.86, 0.55))


def test_crop_applies_the_normalised_box_at_any_resolution():
    film = np.arange(400 * 300, dtype=np.float32).reshape(400, 300)
    crop = crop_to_lungs(film, (0.25, 0.5, 0.75, 1.0))
    assert crop.shape == (200, 150)
    assert crop[0, 0] == film[100, 150]


def test_border_probe_replaces_the_outer_share_of_each_side():
    film = np.linspace(0, 1, 100 * 50, dtype=np.float32).reshape(100, 50)
    black = with_border(film, 0.12, "black")
    assert black[:12].max() == 0 and black[-12:].max() == 0 and black[:, :6].max() == 0
    assert np.array_equal(black[12:-12, 6:-6], film[12:-12, 6:-6])
    grey = with_border(film, 0.08, "mean")
    assert grey[0, 0] == pytest.approx(film.mean())


def test_wilson_interval_holds_the_proportion_and_stays_in_range():
    low, high = wilson(39, 39)
    assert high == pytest.approx(1.0) and 0.9 < low < 1.0
    low, high = wilson(20, 40)
    assert low < 0.5 < high
    assert np.isnan(wilson(0, 0)[0])


def test_patient_bootstrap_widens_when_a_patients_films_agree():
    """Five films per patient that score alike carry about one film's worth of evidence: resampling
    films would overstate the precision; resampling patients does not."""
    rng = np.random.default_rng(0)
    patient_y = np.array([0] * 6 + [1] * 6)
    patient_score = patient_y * 0.3 + rng.random(12) * 0.8
    y = np.repeat(patient_y, 5)
    prob = np.repeat(patient_score, 5) + rng.normal(0, 0.01, 60)
    by_film = patient_bootstrap_auc(y, prob, [f"f{i}" for i in range(60)], draws=400)
    by_patient = patient_bootstrap_auc(y, prob, [f"p{i // 5}" for i in range(60)], draws=400)
    assert by_film[0] < by_film[1] and by_patient[0] < by_patient[1]
    assert (by_patient[1] - by_patient[0]) > 1.5 * (by_film[1] - by_film[0])


def test_lung_share_counts_heat_inside_the_dilated_lungs_only():
    from models.attention import lung_share, on_film_grid

    lungs = _two_lungs()
    inside = np.zeros((128, 128), np.float32)
    inside[60, 30] = 1.0
    corner = np.zeros((128, 128), np.float32)
    corner[2, 2] = 1.0
    edge = np.zeros((128, 128), np.float32)
    edge[60, 57] = 1.0  # two pixels beyond the right edge of the left field: within the dilation
    assert lung_share(inside, lungs) == 1.0
    assert lung_share(corner, lungs) == 0.0
    assert lung_share(edge, lungs) == 1.0
    assert lung_share(inside + corner, lungs) == pytest.approx(0.5)
    # a crop's map lands where the crop came from on the film
    placed = on_film_grid(np.ones((16, 16), np.float32), (0.25, 0.5, 0.75, 1.0), 128)
    assert placed[32:96, 64:].min() == pytest.approx(1.0)
    assert placed[:32].max() == 0 and placed[:, :64].max() == 0


def test_model_evaluate_reports_the_shift_check_and_the_border_probes(kermany, model_dir, tmp_path):
    """`cxr-triage model evaluate --external DIR --border-probes` through the real CLI: a small
    external folder (real films, a manifest with two films per patient) gives every figure."""
    import csv
    import json
    import shutil
    import subprocess

    from tests.conftest import CLI, kermany_files

    films = kermany_files(kermany, "NORMAL", 4) + kermany_files(kermany, "PNEUMONIA", 4)
    (tmp_path / "images").mkdir()
    labelled = tmp_path / "labelled"  # the same films as a NORMAL/ + PNEUMONIA/ folder
    for film in films:
        (labelled / film.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(film, labelled / film.parent.name / film.name)
    with (tmp_path / "manifest.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "view", "patient"])
        for i, film in enumerate(films):
            shutil.copy(film, tmp_path / "images" / film.name)
            label = "pneumonia" if film.parent.name == "PNEUMONIA" else "normal"
            writer.writerow([f"images/{film.name}", label, "PA" if i % 2 else "AP", f"patient{i // 2}"])
    args = [str(labelled), "--model-dir", str(model_dir), "--external", str(tmp_path), "--border-probes"]
    result = subprocess.run(
        [CLI, "model", "evaluate", *args, "--json", "--roc-png", str(tmp_path / "roc.png")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    external = report["external"]
    assert external["films"] == 8 and external["pneumonia"] == 4
    assert external["scored"]["films"] + external["turned_away"] == 8
    assert 0.0 <= external["all_decoded"]["roc_auc"] <= 1.0
    assert external["all_decoded"]["patients"] == 4
    assert set(external["border_probes"]) >= {"none", "black_12%", "mean_grey_8%_drop"}
    assert report["border_probes"]["films"] == report["images"]


def test_an_ensemble_reads_its_members_crop_and_refuses_members_that_read_different_inputs():
    from models.ensemble import shared_crop

    crop = {"kind": "lungs", "lung_model": "lungs.tflite", "margin": 0.08, "lung_model_sha256": "ab"}
    suppressed = {**crop, "suppress": True}
    assert shared_crop([Path("a"), Path("b")], [{"crop": suppressed}] * 2) == ("a/lungs.tflite", True)
    assert shared_crop([Path("a")], [{}]) == (None, False)
    for other in ({}, {"crop": crop}):
        with pytest.raises(ValueError, match="different inputs"):
            shared_crop([Path("a"), Path("b")], [{"crop": suppressed}, other])
