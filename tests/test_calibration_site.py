"""Site calibration end to end on films held out of training (the validation patients).

About 100 held-out Kermany films (40 normal, 60 pneumonia, one per patient) play the site's
labelled sample; other held-out films are scanned into the worklist first (in-process on
SQLite, by a running Celery worker on PostgreSQL). After ``cxr-triage model calibrate`` the
active calibration holds the fitted thresholds and the worklist tiers follow it; going back to
``shipped`` restores them. The remaining held-out films check the issue's targets.

On the raw held-out films the fitted thresholds land close to the shipped ones (same hospital),
so the worklist test plays a *new site* whose films are framed more tightly: every film,
labelled or scanned, is the held-out film cropped to its central 80 %, scaled back to its
size and saved as an 8-bit PNG (the model card's stress test: this alone drops specificity
at the shipped screening threshold to about 0.80).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from db.calibration import SHIPPED, ShippedThresholds, thresholds_in_force, tier
from db.engine import session_scope
from db.schema import Image, ImageStatus, Score
from pipeline.ood import ORIENTATION_REASON
from tests.conftest import CLI, copy_into


def held_out_films(kermany: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(calibration sample: 40 normal + 60 pneumonia films of distinct patients, the other held-out films).

    The held-out films are those of the validation patients (models/splits/val_patients.txt),
    never trained on. No patient is on both sides.
    """
    from models import data
    from models.site_draws import site_sample

    val = data.read_split()
    held = [s for s in data.list_samples(kermany) if s.patient in val]
    picked = [held[i] for i in site_sample([s.patient for s in held], [s.pneumonia for s in held],
                                          np.random.default_rng(12))]  # fmt: skip
    chosen = {s.patient for s in picked}
    rest = [(s.path, s.pneumonia) for s in held if s.patient not in chosen]
    return [(s.path, s.pneumonia) for s in picked], rest


def site_copy(films: list[Path], folder: Path, crop: float = 0.8) -> None:
    """The films as a tighter-framed site delivers them: central ``crop`` of the image, 8-bit PNG."""
    from PIL import Image

    from pipeline.decode import decode_file

    folder.mkdir(parents=True, exist_ok=True)
    for path in films:
        grey = decode_file(path).pixels
        h, w = grey.shape
        dh, dw = int(h * (1 - crop) / 2), int(w * (1 - crop) / 2)
        crop_px = np.clip(grey[dh : h - dh, dw : w - dw] * 255 + 0.5, 0, 255).astype(np.uint8)
        film = Image.fromarray(crop_px, mode="L").resize((w, h), Image.Resampling.BILINEAR)  # same size
        film.save(folder / (path.stem + ".png"))


def _run(args: list[str], env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=600)
    if ok:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def _tiers(url: str, shipped: ShippedThresholds) -> tuple[dict[str, str], dict[str, str], str]:
    """Tiers of every scored film under the thresholds stored with its score and under those in force."""
    with session_scope(url) as session:
        rows = session.execute(
            select(
                Image.sha256,
                Score.pneumonia_probability,
                Score.screening_threshold,
                Score.high_confidence_threshold,
            )
            .join(Score)
            .where(Image.status == ImageStatus.SCORED)
        ).all()
        name, screening, high = thresholds_in_force(session, shipped)
    stored = {sha: tier(p, s, h) for sha, p, s, h in rows}
    in_force = {sha: tier(p, screening, high) for sha, p, _, _ in rows}
    return stored, in_force, name


def _shipped(model_dir: Path) -> ShippedThresholds:
    return ShippedThresholds.from_metadata(json.loads((model_dir / "metadata.json").read_text()))


@pytest.mark.extended  # 100 held-out films of the full training set
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def test_calibrate_on_held_out_films_changes_the_worklist_tiers(
    backend, kermany, model_dir, tmp_path, request
):
    sample, rest = held_out_films(kermany)
    site = tmp_path / "site"
    for label, folder in ((0, "NORMAL"), (1, "PNEUMONIA")):
        site_copy([p for p, y in sample if y == label], site / folder)
    drop = tmp_path / "drop"
    negatives = [p for p, y in rest if y == 0][:30]
    positives = [p for p, y in rest if y == 1][:20]
    site_copy(negatives + positives, drop)
    shipped = _shipped(model_dir)

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
        env = None
        _run(["scan", str(drop), "--database-url", url, "--no-progress", "--decode-workers", "0"])
        cluster = None
    else:
        from tests.conftest import services_env, start_cli, stop_group

        url = request.getfixturevalue("pg_url")
        env = services_env(url, request.getfixturevalue("redis_url"), 20, CXR_TRIAGE_LOG_LEVEL="INFO")
        _run(["db", "upgrade"], env)
        cluster = start_cli(["worker", "--processes", "1"], env, tmp_path / "worker.log")
    try:
        if cluster is not None:
            _run(["scan", str(drop), "--wait", "--no-progress"], env)
        before = json.loads(_run(["model", "calibrations", "--json", "--database-url", url], env).stdout)
        assert [(r["name"], r["active"]) for r in before] == [(SHIPPED, True)]
        stored, in_force, name = _tiers(url, shipped)
        # the OOD guard's orientation check may reject one real film (it keeps >= 99.5 % of the
        # validation films; person1463_bacteria_3811 of these 50 looks turned to it)
        with session_scope(url) as session:
            turned = session.execute(
                select(Image.sha256).where(
                    Image.status == ImageStatus.REJECTED, Image.reason == ORIENTATION_REASON
                )
            ).all()
        assert name == SHIPPED and stored == in_force and len(stored) + len(turned) == 50 and len(turned) <= 1

        fit = json.loads(
            _run(
                ["model", "calibrate", str(site), "--name", "site-a", "--json", "--database-url", url], env
            ).stdout
        )
        # the calibration leaves out what the input checks turn away: one of these 100 films (the
        # orientation check keeps 99.8 % of the validation films)
        left_out = 100 - fit["sample_size"]
        assert left_out <= 1 and fit["positives"] >= 60 - left_out and not fit["too_small"]
        listed = {
            r["name"]: r
            for r in json.loads(_run(["model", "calibrations", "--json", "--database-url", url], env).stdout)
        }
        assert listed["site-a"]["active"] and not listed[SHIPPED]["active"]
        assert listed["site-a"]["screening_threshold"] == pytest.approx(fit["screening_threshold"])
        assert listed["site-a"]["details"]["screening"]["sensitivity"]["low"] <= 1.0

        stored, in_force, name = _tiers(url, shipped)
        changed = sum(stored[k] != in_force[k] for k in stored)
        print(
            f"\n{backend}: site-a thresholds {fit['screening_threshold']:.4f} / "
            f"{fit['high_confidence_threshold']:.4f} (shipped {shipped.screening_threshold} / "
            f"{shipped.high_confidence_threshold}); "
            f"{changed} of {len(stored)} worklist tiers changed"
        )
        assert name == "site-a" and changed > 0
        # films scored from now on (by the worker started before the calibration: no restart) are
        # stored with the active calibration's thresholds
        later = tmp_path / "later"
        site_copy([p for p, _ in rest[-4:]], later)
        if cluster is None:
            _run(["scan", str(later), "--database-url", url, "--no-progress", "--decode-workers", "0"])
        else:
            _run(["scan", str(later), "--wait", "--no-progress"], env)
        with session_scope(url) as session:
            assert thresholds_in_force(session, shipped)[1:] == (
                pytest.approx(fit["screening_threshold"]),
                pytest.approx(fit["high_confidence_threshold"]),
            )
            newest = session.scalars(select(Score).order_by(Score.id.desc()).limit(4)).all()
        assert len(newest) == 4
        for score in newest:
            assert score.screening_threshold == pytest.approx(fit["screening_threshold"])
            assert score.high_confidence_threshold == pytest.approx(fit["high_confidence_threshold"])

        _run(["model", "calibrations", "--activate", SHIPPED, "--database-url", url], env)
        stored, in_force, name = _tiers(url, shipped)
        assert name == SHIPPED and len(stored) + len(turned) == 54
    finally:
        if cluster is not None:
            stop_group(cluster, timeout=60)


def test_too_small_a_sample_is_refused_without_force(kermany, model_dir, tmp_path):
    sample, _ = held_out_films(kermany)
    site = tmp_path / "small"
    copy_into([p for p, y in sample if y == 0][:10], site / "NORMAL")
    copy_into([p for p, y in sample if y == 1][:20], site / "PNEUMONIA")
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    refused = _run(["model", "calibrate", str(site), "--database-url", url], ok=False)
    assert refused.returncode == 3 and "SAMPLE TOO SMALL" in refused.stderr
    listed = json.loads(_run(["model", "calibrations", "--json", "--database-url", url]).stdout)
    assert [r["name"] for r in listed] == [SHIPPED]
    _run(["model", "calibrate", str(site), "--force", "--name", "tiny", "--database-url", url])
    listed = json.loads(_run(["model", "calibrations", "--json", "--database-url", url]).stdout)
    assert [r["name"] for r in listed if r["active"]] == ["tiny"] and listed[-1]["details"]["forced"]


@pytest.mark.extended  # 100 held-out films of the full training set, and the rest
@pytest.mark.parametrize("site", ["as-is", "cropped-80"])
def test_targets_on_the_remaining_held_out_films(site, kermany, scorer, tmp_path):
    """Issue targets: sensitivity >= 0.95 with specificity >= 0.75 at screening, >= 0.95 spec at high."""
    from models.calibration import calibrate, estimate_at
    from worker.cli.calibration_commands import score_labelled

    sample, rest = held_out_films(kermany)
    if site == "cropped-80":
        sample, rest = _cropped(sample, tmp_path / "sample"), _cropped(rest, tmp_path / "rest")
    fitted = score_labelled(scorer, sample)
    fit = calibrate(fitted.labels, fitted.probabilities, fitted.logits, scorer.temperature)
    remaining = score_labelled(scorer, rest)
    screening = estimate_at(remaining.labels, remaining.probabilities, fit.screening_threshold)
    high = estimate_at(remaining.labels, remaining.probabilities, fit.high_confidence_threshold)
    shipped = estimate_at(remaining.labels, remaining.probabilities, scorer.screening_threshold)
    print(
        f"\n{site}: fitted on {fit.sample_size} films: screening {fit.screening_threshold:.4f}, "
        f"high {fit.high_confidence_threshold:.4f}\n"
        f"remaining {len(remaining.labels)} films ({int(remaining.labels.sum())} pneumonia, "
        f"{remaining.out_of_distribution} flagged OOD): screening sensitivity "
        f"{screening.sensitivity.text()}, specificity {screening.specificity.text()}; "
        f"high-confidence sensitivity {high.sensitivity.text()}, specificity {high.specificity.text()}; "
        f"shipped screening threshold: sensitivity {shipped.sensitivity.text()}, "
        f"specificity {shipped.specificity.text()}"
    )
    assert screening.sensitivity.value >= 0.95 and screening.specificity.value >= 0.75
    assert high.specificity.value >= 0.95


def _cropped(films: list[tuple[Path, int]], folder: Path) -> list[tuple[Path, int]]:
    site_copy([p for p, _ in films], folder)
    return [(folder / (p.stem + ".png"), y) for p, y in films]
