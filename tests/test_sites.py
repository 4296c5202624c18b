"""Sites in the database (db/sites.py), per-site calibrations in the worklist view, the quality report
(db/quality.py) and migration 0006 -- on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from datetime import timedelta

import numpy as np
import pytest
from alembic import command
from sqlalchemy import select, text, update

from db import queue
from db.calibration import (
    SHIPPED,
    ShippedThresholds,
    activate_calibration,
    ensure_shipped,
    store,
    thresholds_in_force,
)
from db.engine import get_engine, session_scope
from db.migrate import alembic_config, upgrade
from db.quality import quality_report
from db.queue import FileSeen, ScoreRecord
from db.schema import Image, utcnow
from db.sites import DEFAULT_SITE, SiteError, add_site, calling_ae_of, list_sites, received_file_name
from db.worklist import WorklistFilter, query_rows

SHIPPED_M1 = ShippedThresholds("m1", 0.2, 0.8, 1.0)


def _register(url: str, n: int, path: str) -> int:
    with session_scope(url) as session:
        image_id, _ = queue.register(session, FileSeen(path, 10, n), f"{n:064x}")
    return image_id


def _score(url: str, image_id: int, p: float, hours_ago: float = 0.0) -> None:
    with session_scope(url) as session:
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(first_seen_at=utcnow() - timedelta(hours=hours_ago))
        )
        queue.record_score(session, image_id, ScoreRecord("m1", p, math.log(p / (1 - p)), None, 0.2, 0.8))


def test_received_file_names_carry_the_calling_ae_title():
    digest = "ab" * 16
    assert calling_ae_of("/in/" + received_file_name(digest, "CT ROOM/2")) == "CT ROOM/2"
    assert calling_ae_of("/in/" + received_file_name(digest, "")) is None
    assert "/" not in received_file_name(digest, "A/B") and " " not in received_file_name(digest, "A B")
    assert calling_ae_of("/in/abc.dcm") is None


def test_films_record_their_site_from_folder_or_calling_ae(url, tmp_path):
    a, b = tmp_path / "ward-a", tmp_path / "ward-b"
    early = _register(url, 1, str(a / "early.png"))  # before any site exists: default
    with session_scope(url) as session:
        assert add_site(session, "ward-a", folders=[a]) == 1, "the default film under A's folder moved"
        add_site(session, "ward-b", folders=[b], calling_aes=["MODALITY_B"])
        add_site(session, "nested", folders=[a / "icu"])  # the longest prefix wins
        with pytest.raises(SiteError, match="already belongs"):
            add_site(session, "other", folders=[b])
        with pytest.raises(SiteError):
            add_site(session, DEFAULT_SITE, folders=[tmp_path / "x"])
    films = {
        "a": _register(url, 2, str(a / "x.png")),
        "icu": _register(url, 3, str(a / "icu" / "y.png")),
        "b": _register(url, 4, str(b / "z.png")),
        "ae": _register(url, 5, str(tmp_path / "listener" / received_file_name("cd" * 16, "MODALITY_B"))),
        "other": _register(url, 6, str(tmp_path / "elsewhere" / "w.png")),
        "prefix-only": _register(url, 7, str(tmp_path / "ward-ab" / "v.png")),  # not under ward-a/
    }
    with session_scope(url) as session:
        site = dict(session.execute(select(Image.id, Image.site)).all())
        listed = {s.name: s for s in list_sites(session)}
    assert site[early] == "ward-a" and site[films["a"]] == "ward-a" and site[films["icu"]] == "nested"
    assert site[films["b"]] == "ward-b" and site[films["ae"]] == "ward-b"
    assert site[films["other"]] == DEFAULT_SITE and site[films["prefix-only"]] == DEFAULT_SITE
    assert listed["ward-b"].calling_aes == ["MODALITY_B"] and listed["ward-a"].films == 2


def test_each_film_follows_its_own_sites_calibration(url, tmp_path):
    with session_scope(url) as session:
        add_site(session, "a", folders=[tmp_path / "a"])
        add_site(session, "b", folders=[tmp_path / "b"])
        ensure_shipped(session, SHIPPED_M1)
    for n, p in enumerate((0.3, 0.5, 0.7)):
        _score(url, _register(url, n, str(tmp_path / "a" / f"{n}.png")), p)
        _score(url, _register(url, 10 + n, str(tmp_path / "b" / f"{n}.png")), p)

    def tiers(site: str) -> list[tuple[str, float, str]]:
        with session_scope(url) as session:
            rows = query_rows(session, WorklistFilter(site=site))
        return sorted((r["tier"], r["threshold"], r["calibration"]) for r in rows)

    before = tiers("b")
    assert before == [("screen+", 0.2, SHIPPED)] * 3
    with session_scope(url) as session:
        store(
            session, name="a-local", model_version="m1", screening_threshold=0.45,
            high_confidence_threshold=0.6, source="labels", sample_size=100, positives=60,
            target_sensitivity=0.98, target_specificity=0.95, temperature=1.0, site="a",
        )  # fmt: skip
        assert thresholds_in_force(session, SHIPPED_M1, "a")[0] == "a-local"
        assert thresholds_in_force(session, SHIPPED_M1, "b")[0] == SHIPPED
        assert thresholds_in_force(session, SHIPPED_M1)[0] == SHIPPED
    assert tiers("a") == [("HIGH", 0.45, "a-local"), ("below", 0.45, "a-local"), ("screen+", 0.45, "a-local")]
    assert tiers("b") == before, "site b keeps the shipped thresholds"
    with session_scope(url) as session:
        rows = query_rows(session)
        assert {r["site"] for r in rows} == {"a", "b"}
        with pytest.raises(Exception, match="not one of site"):
            activate_calibration(session, "m1", "a-local", site="b")
        activate_calibration(session, "m1", SHIPPED, site="a")  # back to the one for every site
    assert tiers("a") == before


def _sample_logits(rng, n: int, pneumonia_share: float) -> np.ndarray:
    sick = rng.random(n) < pneumonia_share
    p = np.where(sick, rng.beta(6, 2, n), rng.beta(2, 6, n))
    return np.log(p / (1 - p))


def test_quality_report_says_drifted_for_a_changed_mix_and_stable_for_the_same(url, tmp_path):
    rng = np.random.default_rng(5)
    with session_scope(url) as session:
        ensure_shipped(session, SHIPPED_M1)
        for name in ("same", "changed"):
            add_site(session, name, folders=[tmp_path / name])
            store(
                session, name=f"{name}-cal", model_version="m1", screening_threshold=0.3,
                high_confidence_threshold=0.8, source="labels", sample_size=100, positives=60,
                target_sensitivity=None, target_specificity=None, temperature=1.0, site=name,
                details={"sample_logits": [round(x, 4) for x in _sample_logits(rng, 100, 0.6)]},
            )  # fmt: skip
    n = 0
    for name, share in (("same", 0.6), ("changed", 0.0)):
        for logit in _sample_logits(rng, 150, share):
            n += 1
            p = float(np.clip(1 / (1 + np.exp(-logit)), 1e-4, 1 - 1e-4))
            _score(url, _register(url, n, str(tmp_path / name / f"{n}.png")), p, hours_ago=n % 100)
    with session_scope(url) as session:
        report = quality_report(session)
        one = quality_report(session, site="changed")
    parts = {part["site"]: part for part in report["sites"]}
    assert parts["same"]["drift"]["verdict"] == "stable", parts["same"]["drift"]
    assert parts["changed"]["drift"]["verdict"] == "drifted", parts["changed"]["drift"]
    assert parts[DEFAULT_SITE]["drift"]["verdict"] == "insufficient"
    assert (
        parts["changed"]["totals"]["scored"] == 150
        and parts["changed"]["calibration"]["name"] == "changed-cal"
    )
    flagged = parts["changed"]["totals"]["flagged_screen"]
    assert flagged["low"] <= flagged["estimate"] <= flagged["high"]
    assert parts["same"]["totals"]["flagged_screen"]["estimate"] > flagged["estimate"]
    assert [p["site"] for p in one["sites"]] == ["changed"]
    assert sum(parts["same"]["histogram"]["recent"]) == pytest.approx(1.0)


def alert_fires(gauges, tmp_path) -> dict[str, bool]:
    """Whether ``CxrTriageSiteScoreDrifted`` fires for each site when Prometheus scrapes these gauges
    (db.quality.site_gauges: what /metrics serves) for two hours: ``promtool test rules`` on the
    shipped rule file, with one test per site that expects the alert exactly where the gauge says so."""
    import shutil
    import subprocess

    import yaml

    from tests.conftest import REPO

    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    rules = REPO / "deploy" / "prometheus" / "cxr-triage-rules.yml"
    fires = {}
    for gauge in gauges:
        value = 1 if gauge.drifted else 0
        annotations = {
            "summary": f"Score distribution drifted at site {gauge.site}",
            "description": f"See `cxr-triage quality --site {gauge.site}` or /quality; "
            "recalibrate the site if the change is lasting.",
        }
        labels = {"severity": "warning", "site": gauge.site}
        expected = [{"exp_labels": labels, "exp_annotations": annotations}] if value else []
        test = {
            "rule_files": [str(rules)],
            "evaluation_interval": "1m",
            "tests": [
                {
                    "interval": "5m",
                    "input_series": [
                        {
                            "series": f'cxr_triage_site_score_drifted{{site="{gauge.site}"}}',
                            "values": f"{value}x30",
                        }
                    ],
                    "alert_rule_test": [
                        {"eval_time": "2h", "alertname": "CxrTriageSiteScoreDrifted", "exp_alerts": expected}
                    ],
                }
            ],
        }
        path = tmp_path / f"drift-{gauge.site}.test.yml"
        path.write_text(yaml.safe_dump(test))
        checked = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        fires[gauge.site] = bool(value)
    return fires


def test_a_drifted_site_fires_the_alert_rule(sqlite_url, tmp_path):
    """quality's verdict reaches Prometheus: the drifted site's gauge fires the shipped alert rule
    (promtool), the stable site's does not."""
    from db.quality import site_gauges

    upgrade(sqlite_url)
    test_quality_report_says_drifted_for_a_changed_mix_and_stable_for_the_same(sqlite_url, tmp_path)
    with session_scope(sqlite_url) as session:
        gauges = {g.site: g for g in site_gauges(session)}
    assert gauges["changed"].drifted and not gauges["same"].drifted
    assert gauges["changed"].psi > 0.1 and gauges["changed"].ks_p_value < 0.01
    assert gauges["same"].films == 150 and gauges["same"].last_film_age_seconds < 3600
    fires = alert_fires([gauges["changed"], gauges["same"]], tmp_path)
    assert fires == {"changed": True, "same": False}

    # and /metrics serves them (the web app's routes; the standalone server answers the same)
    from starlette.applications import Starlette
    from starlette.testclient import TestClient

    from tests.test_metrics_services import samples, total
    from worker.metrics.server import starlette_routes
    from worker.settings import Settings

    settings = Settings.build(database_url=sqlite_url, broker_url="", min_free_disk_mb=1)
    with TestClient(Starlette(routes=starlette_routes(settings))) as client:
        found = samples(client.get("/metrics").text)
    assert total(found, "cxr_triage_site_score_drifted", site="changed") == 1
    assert total(found, "cxr_triage_site_score_drifted", site="same") == 0
    assert total(found, "cxr_triage_site_films_7d", site="same") == 150
    assert total(found, "cxr_triage_site_score_psi", site="changed") == pytest.approx(gauges["changed"].psi)


def test_migration_0006_up_and_down_over_existing_films(url, tmp_path):
    config = alembic_config(url)
    command.downgrade(config, "0005")
    with get_engine(url).begin() as connection:  # a film stored by the old schema
        connection.execute(
            text(
                "INSERT INTO images (sha256, status, attempts, size_bytes, out_of_scope, first_seen_at, "
                "updated_at) VALUES (:sha, 'queued', 0, 10, false, :at, :at)"
            ),
            {"sha": "0" * 64, "at": utcnow()},
        )
        connection.execute(
            text(
                "INSERT INTO source_files (path, image_id, size_bytes, mtime_ns, seen_at) "
                "VALUES (:p, 1, 10, 1, :at)"
            ),
            {"p": str(tmp_path / "a" / "old.png"), "at": utcnow()},
        )  # fmt: skip
    upgrade(url)
    with session_scope(url) as session:
        assert [r["site"] for r in query_rows(session)] == [DEFAULT_SITE]
        add_site(session, "a", folders=[tmp_path / "a"])
    with session_scope(url) as session:
        assert [r["site"] for r in query_rows(session)] == ["a"], "the old film moved to its site"
    command.downgrade(config, "0005")
    with get_engine(url).connect() as connection:
        columns = list(connection.execute(text("SELECT * FROM triage_worklist")).keys())
    assert "site" not in columns and "study_date" in columns
    upgrade(url)
