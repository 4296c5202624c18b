"""Several sites, one installation, end to end (issue 29): real films, the real CLI, a Celery worker on
real Redis that was started before the calibration, on SQLite and PostgreSQL.

Site ``a`` frames its films more tightly (the central 80 %, saved as 8-bit PNG: the model card's
stress test) and is calibrated from its own labelled films; site ``b`` delivers the films as they
are and keeps the shipped thresholds. Afterwards every film of ``a`` -- those in the worklist and
those scored later by the same worker -- follows a's thresholds, every film of ``b`` the shipped ones.

The sample in tests/data is small (16 normal films), so the calibration is stored with ``--force``.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import select

from db.calibration import SHIPPED, tier
from db.engine import session_scope
from db.schema import Image, Score
from tests.conftest import CLI, copy_into, kermany_files, services_env, start_cli, stop_group, wait_final
from tests.test_calibration_site import site_copy

WAIT_S = 600


def _run(args: list[str], env: dict) -> subprocess.CompletedProcess:
    result = subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _worklist(env: dict, *extra: str) -> list[dict]:
    return json.loads(_run(["worklist", "--format", "json", *extra], env).stdout)


@pytest.mark.services
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_each_site_follows_its_own_calibration_with_a_running_worker(
    backend, kermany, model_dir, tmp_path, request
):
    normal = kermany_files(kermany, "NORMAL", 16)
    pneumonia = kermany_files(kermany, "PNEUMONIA", 48)
    labels = tmp_path / "a-labelled"
    site_copy(normal[:10], labels / "NORMAL")
    site_copy(pneumonia[:30], labels / "PNEUMONIA")
    a, b = tmp_path / "drop" / "a", tmp_path / "drop" / "b"
    site_copy(normal[10:13] + pneumonia[30:34], a / "first")
    copy_into(normal[13:16] + pneumonia[34:38], b / "first")

    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    env = services_env(url, request.getfixturevalue("redis_url"), 20, CXR_TRIAGE_LOG_LEVEL="INFO")
    _run(["db", "upgrade"], env)
    _run(["sites", "add", "a", "--folder", str(a)], env)
    _run(["sites", "add", "b", "--folder", str(b), "--calling-ae", "WARD_B"], env)
    worker = start_cli(["worker", "--processes", "1"], env, tmp_path / "worker.log")
    try:
        for folder in (a / "first", b / "first"):
            _run(["scan", str(folder), "--wait", "--no-progress"], env)
        wait_final(url, 14, WAIT_S)
        shipped = json.loads((model_dir / "metadata.json").read_text())
        before = _worklist(env)
        assert {r["site"] for r in before} == {"a", "b"}
        assert {r["calibration"] for r in before if r["status"] == "scored"} == {SHIPPED}

        fit = json.loads(
            _run(
                ["model", "calibrate", str(labels), "--site", "a", "--name", "a-local", "--force", "--json"],
                env,
            ).stdout
        )
        assert fit["sample_size"] >= 38
        assert fit["screening_threshold"] != pytest.approx(shipped["screening_threshold"], abs=1e-4)
        listed = {
            r["name"]: r
            for r in json.loads(_run(["model", "calibrations", "--site", "a", "--json"], env).stdout)
        }
        assert listed["a-local"]["active"] and listed["a-local"]["site"] == "a"
        assert listed["a-local"]["sample_scores_stored"] == fit["sample_size"]
        assert listed[SHIPPED]["active"] and listed[SHIPPED]["site"] is None, "the shipped one stays for b"

        after = _worklist(env)
        scored = [r for r in after if r["status"] == "scored"]
        assert {r["site"] for r in scored} == {"a", "b"}
        for row in scored:
            expected = (
                (fit["screening_threshold"], fit["high_confidence_threshold"], "a-local")
                if row["site"] == "a"
                else (shipped["screening_threshold"], shipped["high_confidence_threshold"], SHIPPED)
            )
            assert (row["threshold"], row["high_confidence_threshold"], row["calibration"]) == (
                pytest.approx(expected[0]),
                pytest.approx(expected[1]),
                expected[2],
            )
            want = {"high_confidence": "HIGH", "screen_positive": "screen+", "negative": "below"}
            assert row["tier"] == want[tier(row["score"], row["threshold"], row["high_confidence_threshold"])]
        assert [r["site"] for r in _worklist(env, "--site", "b")] == ["b"] * sum(
            r["site"] == "b" for r in after
        )
        csv_lines = _run(["worklist", "--format", "csv", "--site", "a"], env).stdout.splitlines()
        header = csv_lines[0].split(",")
        assert "site" in header and all(
            line.split(",")[header.index("site")] == "a" for line in csv_lines[1:]
        )

        # films scored from now on by the worker started before the calibration: no restart
        site_copy(pneumonia[38:41], a / "later")
        copy_into(pneumonia[41:44], b / "later")
        for folder in (a / "later", b / "later"):
            _run(["scan", str(folder), "--wait", "--no-progress"], env)
        wait_final(url, 20, WAIT_S)
        with session_scope(url) as session:
            later = session.execute(
                select(Image.site, Score.screening_threshold)
                .join(Score, Score.image_id == Image.id)
                .order_by(Score.id.desc())
                .limit(6)
            ).all()
        assert sorted(site for site, _ in later) == ["a"] * 3 + ["b"] * 3
        for site, threshold in later:
            wanted = fit["screening_threshold"] if site == "a" else shipped["screening_threshold"]
            assert threshold == pytest.approx(wanted), site

        # back to the shipped thresholds at site a alone
        _run(["model", "calibrations", "--site", "a", "--activate", SHIPPED], env)
        assert {r["calibration"] for r in _worklist(env) if r["status"] == "scored"} == {SHIPPED}
    finally:
        stop_group(worker, timeout=60)
    log = Path(tmp_path / "worker.log").read_text()
    assert str(a) not in log and str(b) not in log, "no file paths in the worker's log"


@pytest.mark.extended  # held-out films of the full training set
def test_quality_says_drifted_when_a_sites_case_mix_changes_and_the_alert_fires(kermany, tmp_path):
    """Two sites calibrated on the same 100 held-out films (40 normal, 60 pneumonia). Site ``same``
    then receives 150 other held-out films in that mix, site ``changed`` only normal films (a
    screening clinic's day, say). ``quality`` calls ``same`` stable and ``changed`` drifted, and
    the gauge Prometheus scrapes for ``changed`` fires the shipped alert rule in promtool."""
    from db.quality import site_gauges
    from tests.test_calibration_site import held_out_films
    from tests.test_sites import alert_fires

    sample, rest = held_out_films(kermany)
    labels = tmp_path / "labelled"
    copy_into([p for p, y in sample if y == 0], labels / "NORMAL")
    copy_into([p for p, y in sample if y == 1], labels / "PNEUMONIA")
    normal = [p for p, y in rest if y == 0]
    sick = [p for p, y in rest if y == 1]
    copy_into(normal[:60] + sick[:90], tmp_path / "drop" / "same")
    copy_into(normal[60:150], tmp_path / "drop" / "changed")
    url = f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    env = {
        k: v for k, v in os.environ.items() if k not in ("CXR_TRIAGE_BROKER_URL", "PROMETHEUS_MULTIPROC_DIR")
    }
    env["CXR_TRIAGE_DATABASE_URL"] = url  # scored in-process: no broker
    for site in ("same", "changed"):
        _run(["sites", "add", site, "--folder", str(tmp_path / "drop" / site)], env)
        fit = json.loads(
            _run(
                ["model", "calibrate", str(labels), "--site", site, "--name", f"{site}-cal", "--json"], env
            ).stdout
        )
        assert fit["sample_size"] == 100 and not fit["too_small"]
    _run(["scan", str(tmp_path / "drop"), "--no-progress", "--decode-workers", "0"], env)
    report = json.loads(_run(["quality", "--format", "json"], env).stdout)
    parts = {part["site"]: part for part in report["sites"]}
    print({site: parts[site]["drift"] for site in ("same", "changed")})
    assert parts["same"]["drift"]["verdict"] == "stable" and parts["same"]["drift"]["films"] >= 145
    assert parts["changed"]["drift"]["verdict"] == "drifted" and parts["changed"]["drift"]["films"] >= 85
    assert (
        parts["changed"]["totals"]["flagged_screen"]["estimate"]
        < parts["same"]["totals"]["flagged_screen"]["low"]
    )
    with session_scope(url) as session:
        gauges = {g.site: g for g in site_gauges(session)}
    assert alert_fires([gauges["changed"], gauges["same"]], tmp_path) == {"changed": True, "same": False}
