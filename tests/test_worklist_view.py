"""The worklist view (migration 0004) on SQLite and PostgreSQL: what psql sees is what the CLI prints."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import inspect, text, update

from db import queue
from db.engine import get_engine, session_scope
from db.queue import FileSeen
from db.schema import AuditEvent, Calibration, Image, ImageStatus, SourceFile, utcnow
from db.worklist import WorklistFilter, build_worklist, count_rows, query_rows
from tests.conftest import score_record
from tests.web_helpers import cli


def _film(url: str, n: int, path: str | None = None, **image_values) -> int:
    with session_scope(url) as session:
        image_id, _ = queue.register(session, FileSeen(path or f"/drop/film-{n:03d}.png", 10, n), f"{n:064x}")
        if image_values:
            session.execute(update(Image).where(Image.id == image_id).values(**image_values))
    return image_id


def _scored(url: str, n: int, p: float, version: str = "m1", age_hours: float = 0.0, **values) -> int:
    image_id = _film(url, n, first_seen_at=utcnow() - timedelta(hours=age_hours, seconds=n), **values)
    with session_scope(url) as session:
        queue.record_score(session, image_id, score_record(p, version))
    return image_id


def _mixed_site(url: str) -> None:
    """25 films in every state, each with its own arrival time (no ties in rank)."""
    for n in range(12):
        _scored(url, n, p=(n * 0.083) % 1.0, age_hours=n * 7.0, accession_number=f"ACC{n}")
    _scored(url, 12, p=0.02, age_hours=24 * 30)  # aged: climbs above fresh positives
    for n in (13, 14):
        image_id = _film(url, n, first_seen_at=utcnow() - timedelta(hours=n))
        with session_scope(url) as session:
            queue.record_problem(session, image_id, ImageStatus.FAILED, "truncated image data")
    image_id = _film(url, 15)
    with session_scope(url) as session:
        queue.record_problem(session, image_id, ImageStatus.REJECTED, "modality CT", {"out_of_scope": True})
    for n in (16, 17, 18):
        _film(url, n, first_seen_at=utcnow() - timedelta(minutes=n))
    for n in (19, 20, 21):
        _scored(url, n, p=0.9, reviewed_at=utcnow() - timedelta(hours=n), reviewed_by="dr-x")
    _scored(url, 22, p=0.95, status=ImageStatus.SUPERSEDED)
    named = {"patient_id": "PID-23", "patient_name": "DOE^JANE", "view_position": "AP"}
    _scored(url, 23, p=0.5, study_date=date(2024, 2, 29), **named)
    _scored(url, 24, p=0.31, version="m2")


def _as_time(value) -> datetime | None:
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def test_select_star_is_what_the_cli_prints(url):
    _mixed_site(url)
    with get_engine(url).connect() as connection:
        result = connection.execute(text("SELECT * FROM triage_worklist ORDER BY worklist_rank LIMIT 20"))
        raw = [dict(row) for row in result.mappings()]
    printed = cli("worklist", "--format", "json", "--limit", "20", "--database-url", url)
    assert printed.returncode == 0, printed.stderr
    rows = json.loads(printed.stdout)
    assert [r["sha256"] for r in raw] == [r["sha256"] for r in rows] and len(rows) == 20
    assert "2024-02-29" in {r["study_date"] for r in rows}
    assert list(raw[0]) == list(rows[0]), "same columns in the same order"
    for sql_row, cli_row in zip(raw, rows, strict=True):
        for name, value in sql_row.items():
            shown = cli_row[name]
            if name in ("first_seen_at", "reviewed_at"):
                assert _as_time(value) == _as_time(shown)
            elif name == "paths":
                assert json.loads(value) == shown
            elif name == "study_date":  # a DATE in PostgreSQL, ISO text in SQLite; ISO in JSON
                assert (None if value is None else str(value)) == shown
            elif name in ("screening_positive", "high_confidence", "out_of_scope"):
                assert (None if value is None else bool(value)) == shown
            elif name == "priority" and value is not None:
                assert abs(value - shown) <= 0.011  # the aging term moves by 0.01 every 86 s
            else:
                assert value == shown, name


def test_order_and_aging_rule(url):
    _mixed_site(url)
    with session_scope(url) as session:
        rows = query_rows(session)
    statuses = [r["status"] for r in rows]
    scored_unreviewed = [r for r in rows if r["status"] == "scored" and r["reviewed_at"] is None]
    assert rows[: len(scored_unreviewed)] == scored_unreviewed
    priorities = [r["priority"] for r in scored_unreviewed]
    assert priorities == sorted(priorities, reverse=True)
    aged = next(r for r in rows if r["sha256"] == f"{12:064x}")
    assert aged["priority"] == pytest.approx(100 * 0.02 + 10 * 30, abs=0.05)
    assert aged["tier"] == "below" and rows.index(aged) < 3, "30 days of aging lift a low score"
    n = len(scored_unreviewed)
    assert statuses[n : n + 3] == ["rejected", "failed", "failed"], "could not be scored: newest first"
    assert statuses[n + 3 : n + 6] == ["queued"] * 3
    assert [r["reviewed_by"] for r in rows[-3:]] == ["dr-x"] * 3
    reviewed = [_as_time(r["reviewed_at"]) for r in rows[-3:]]
    assert reviewed == sorted(reviewed, reverse=True), "most recently reviewed first"
    assert all(r["status"] != "superseded" for r in rows) and len(rows) == 24


def test_superseded_films_are_out_by_default(url):
    _mixed_site(url)
    with session_scope(url) as session:
        assert [e.sha256 for e in build_worklist(session, status="superseded")] == [f"{22:064x}"]
        assert count_rows(session) == 24


def test_active_calibration_sets_tiers_thresholds_and_priority(url):
    image_id = _scored(url, 1, p=0.5)
    _scored(url, 2, p=0.5, version="m2")
    with session_scope(url) as session:
        row = query_rows(session)[0]
    assert (row["calibration"], row["threshold"], row["tier"]) == ("shipped", 0.2, "screen+")
    with session_scope(url) as session:
        for name, screening, high, active in (("site-a", 0.3, 0.45, True), ("old", 0.9, 0.95, False)):
            session.add(
                Calibration(
                    name=name,
                    model_version="m1",
                    screening_threshold=screening,
                    high_confidence_threshold=high,
                    active=active,
                    source="labels",
                )
            )
    with session_scope(url) as session:
        rows = {r["sha256"]: r for r in query_rows(session)}
    site = rows[f"{1:064x}"]
    assert (site["calibration"], site["threshold"], site["high_confidence_threshold"]) == (
        "site-a",
        0.3,
        0.45,
    )
    assert site["tier"] == "HIGH" and site["high_confidence"] is True
    assert site["priority"] == pytest.approx(50 + 200, abs=0.05)
    other = rows[f"{2:064x}"]
    assert other["calibration"] == "shipped" and other["tier"] == "screen+", "m2 has no calibration"
    assert list(rows)[0] == site["sha256"], "the calibrated HIGH film comes first"
    assert image_id


def test_a_rescored_film_shows_the_current_models_score(url):
    image_id = _scored(url, 1, p=0.9, version="m1")
    with session_scope(url) as session:
        queue.record_score(session, image_id, score_record(0.1, "m2"))
        row = query_rows(session)[0]
    assert (row["score"], row["model_version"], row["tier"]) == (0.1, "m2", "below")


def test_the_path_shown_is_the_most_recently_seen(url):
    _film(url, 1, path="/drop/old-name.png")
    with session_scope(url) as session:
        queue.register(session, FileSeen("/drop/new-name.png", 10, 2), f"{1:064x}")
        session.execute(
            update(SourceFile)
            .where(SourceFile.path == "/drop/old-name.png")
            .values(seen_at=utcnow() - timedelta(hours=1))
        )
        row = query_rows(session)[0]
    assert row["path"] == "/drop/new-name.png"
    assert row["paths"] == ["/drop/old-name.png", "/drop/new-name.png"]


def test_filters_and_pages_are_cut_in_sql(url):
    _mixed_site(url)
    _film(url, 30, path="/drop/100%_sure/a.png")
    with session_scope(url) as session:
        everything = query_rows(session)
        assert query_rows(session, limit=5, offset=5) == everything[5:10]
        high = query_rows(session, WorklistFilter(tier="HIGH"))
        assert high and all(r["tier"] == "HIGH" for r in high)
        assert {r["patient_id"] for r in query_rows(session, WorklistFilter(search="PID-23"))} == {"PID-23"}
        assert [r["accession_number"] for r in query_rows(session, WorklistFilter(search="ACC3"))] == ["ACC3"]
        assert len(query_rows(session, WorklistFilter(reviewed=True))) == 3
        assert [r["status"] for r in query_rows(session, WorklistFilter(out_of_scope=True))] == ["rejected"]
        literal = query_rows(session, WorklistFilter(folder="/drop/100%_sure"))
        assert [r["path"] for r in literal] == ["/drop/100%_sure/a.png"], "% and _ are literal"
        assert query_rows(session, WorklistFilter(folder="/drop/100")) == []
        today = date.today()
        assert count_rows(session, WorklistFilter(arrived_from=today + timedelta(days=1))) == 0
        assert count_rows(session, WorklistFilter(arrived_to=today - timedelta(days=10))) == 1
        assert count_rows(session, WorklistFilter(status="queued")) == 4
    with pytest.raises(ValueError):
        WorklistFilter(status="bogus")


def test_indexes_for_the_order_and_filters_exist(url):
    inspector = inspect(get_engine(url))
    names = {
        ix["name"] for table in ("images", "scores", "source_files") for ix in inspector.get_indexes(table)
    }
    assert {
        "ix_scores_image_id_id",
        "ix_source_files_image_seen",
        "ix_images_reviewed_at",
        "ix_images_accession_number",
        "ix_images_patient_id",
        "ix_images_study_date",
    } <= names
    assert {"triage_worklist", "triage_worklist_all"} <= set(inspector.get_view_names())


def test_the_audit_log_is_append_only(url):
    with session_scope(url) as session:
        session.add(AuditEvent(username="a", action="view"))
    for statement in ("UPDATE audit_log SET username = 'b'", "DELETE FROM audit_log"):
        with pytest.raises(Exception, match="append-only"), session_scope(url) as session:
            session.execute(text(statement))


def test_worklist_refuses_an_unknown_status(tmp_path):
    result = cli("worklist", "--status", "bogus", "--database-url", f"sqlite:///{tmp_path / 'w.sqlite3'}")
    assert result.returncode == 2 and "bogus" in result.stderr and "superseded" in result.stderr


def test_a_later_table_rebuild_keeps_the_worklist_current(url):
    """A later migration that rebuilds `images` (SQLite batch mode) wraps it in `lifted(op)`; the
    scores survive it (SQLite drops the old table: with foreign keys on, that deleted every score)."""
    import sqlalchemy as sa
    from alembic.migration import MigrationContext
    from alembic.operations import Operations

    from db.worklist_sql import lifted

    _scored(url, 1, p=0.1)
    with get_engine(url).connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            with pytest.raises(RuntimeError, match="foreign keys"), lifted(
                Operations(MigrationContext.configure(connection))
            ):
                pass
            connection.rollback()
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")  # as db/migrations/env.py runs migrations
            connection.commit()
        with connection.begin():
            op = Operations(MigrationContext.configure(connection))
            rebuild = "always" if sqlite else "auto"  # PostgreSQL alters in place
            with lifted(op), op.batch_alter_table("images", recreate=rebuild) as batch:
                batch.add_column(sa.Column("later_column", sa.Integer()))
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")
            connection.commit()
    _scored(url, 2, p=0.9)  # written after the rebuild: the triggers are back
    with session_scope(url) as session:
        rows = query_rows(session)
    assert [r["sha256"] for r in rows] == [f"{2:064x}", f"{1:064x}"]
    assert (rows[1]["score"], rows[1]["tier"]) == (0.1, "below"), "the rebuild kept the older film's score"


@pytest.mark.train
def test_sqlite_worklist_survives_tensorflow_loaded_first(tmp_path):
    """TensorFlow bundles a SQLite without math functions; a process that loads the model before it
    opens the database (a Celery worker) must still keep the view's exp() working."""
    import subprocess
    import sys

    code = f"""
import tensorflow  # first, as a worker that loads its model before opening the database
from db import queue
from db.engine import session_scope
from db.migrate import upgrade
from db.queue import FileSeen, ScoreRecord
from sqlalchemy import text
url = "sqlite:///{tmp_path / 'w.sqlite3'}"
upgrade(url)
with session_scope(url) as session:
    image_id, _ = queue.register(session, FileSeen("/drop/a.png", 1, 1), "ab" * 32)
    queue.record_score(session, image_id, ScoreRecord("m1", 0.9, 2.2, None, 0.2, 0.8))
with session_scope(url) as session:
    print(session.execute(text("SELECT tier FROM triage_worklist")).scalar_one())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "HIGH"
