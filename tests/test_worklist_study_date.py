"""Study date (DICOM StudyDate, migration 0005) end to end, on SQLite and PostgreSQL.

Real DICOM files (tests/dicom_factory.py, with real chest pixels) are scored by the real
`cxr-triage scan`; the date then shows in `worklist --format json`, the CLI table, `GET /api/worklist`,
the worklist page, the film page and the CSV export, and a range of days filters all of them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import shutil
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from alembic import command
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import inspect, select, text, update

from db import queue
from db.attributes import to_columns
from db.engine import get_engine, session_scope
from db.migrate import alembic_config, upgrade
from db.queue import FileSeen, ScoreRecord
from db.schema import Image, utcnow
from db.users import add_user
from db.worklist import WorklistFilter, count_rows, query_rows
from pipeline.dicom import parse_date, read_attributes
from tests.conftest import kermany_files
from tests.dicom_factory import radiograph
from tests.web_helpers import cli
from worker.settings import Settings
from worker.web.app import create_app

ORIGIN = {"Origin": "http://testserver"}
PASSWORD = "a long enough password"


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request):
    value = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(value)
    return value


# -- reading the header -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("20240305", date(2024, 3, 5)),
        (" 20240305 ", date(2024, 3, 5)),  # DA is padded to an even length with a space
        ("1998.11.02", date(1998, 11, 2)),  # ACR-NEMA 2.0
        (b"20240305", date(2024, 3, 5)),  # read as UN
        ("", None),
        (None, None),
        ("20241341", None),  # month 13
        ("20230229", None),  # not a leap year
        ("00000000", None),
        ("2024-03-05", None),  # not a DA form
        ("202403", None),
        ("yesterday", None),
        ("20240305\\20240306", None),  # multi-valued: which one?
    ],
)
def test_a_bad_study_date_is_no_date_never_a_failure(raw, expected):
    assert parse_date(raw) == expected


def test_the_header_date_becomes_the_column():
    assert to_columns({"study_date": date(2024, 3, 5)}) == {"study_date": date(2024, 3, 5)}
    assert to_columns({"study_date": "2024-03-05"}) == {"study_date": date(2024, 3, 5)}
    assert to_columns({"study_date": "31 Feb"}) == {"study_date": None}
    assert to_columns({"study_date": None}) == {"study_date": None}


def _chest(kermany: Path, index: int) -> np.ndarray:
    path = kermany_files(kermany, "PNEUMONIA", index + 1)[index]
    return np.asarray(PILImage.open(path).convert("L")).astype(np.uint16) * 16


def _dicom(kermany: Path, path: Path, index: int, study_date: str | None) -> str:
    """A scoreable chest radiograph with StudyDate written as given (even when invalid); its SHA-256."""
    radiograph(_chest(kermany, index), path)
    if study_date is not None:
        ds = pydicom.dcmread(path)
        ds.StudyDate = study_date
        ds.save_as(path, enforce_file_format=True)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_read_attributes_reads_the_study_date(kermany, tmp_path):
    _dicom(kermany, tmp_path / "a.dcm", 0, "1998.11.02")
    assert read_attributes(pydicom.dcmread(tmp_path / "a.dcm")).study_date == date(1998, 11, 2)
    _dicom(kermany, tmp_path / "b.dcm", 0, None)
    assert read_attributes(pydicom.dcmread(tmp_path / "b.dcm")).study_date is None


# -- scored by the real scan, shown everywhere ------------------------------------------------------------


@pytest.fixture
def scanned(url, kermany, tmp_path):
    """Four DICOM films (a valid date, the ACR-NEMA form, an impossible one, none) and a JPEG, scanned."""
    drop = tmp_path / "drop"
    drop.mkdir()
    shas = {
        "dated": _dicom(kermany, drop / "dated.dcm", 30, "20240305"),
        "acr_nema": _dicom(kermany, drop / "acr_nema.dcm", 31, "1998.11.02"),
        "impossible": _dicom(kermany, drop / "impossible.dcm", 32, "20241341"),
        "undated": _dicom(kermany, drop / "undated.dcm", 33, None),
    }
    jpeg = kermany_files(kermany, "NORMAL", 40)[-1]
    shutil.copy(jpeg, drop / jpeg.name)
    shas["jpeg"] = hashlib.sha256(jpeg.read_bytes()).hexdigest()
    scan = cli("scan", str(drop), "--database-url", url, "--no-progress", "--decode-workers", "0")
    assert scan.returncode == 0, scan.stderr
    return url, shas


EXPECTED = {
    "dated": "2024-03-05",
    "acr_nema": "1998-11-02",
    "impossible": None,
    "undated": None,
    "jpeg": None,
}


def _json_rows(url: str, *flags: str) -> list[dict]:
    result = cli("worklist", "--format", "json", "--database-url", url, *flags)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_scored_dicom_shows_its_study_date_everywhere(scanned):
    """One scan per database (the model's load dominates): the CLI, then the API and the pages."""
    _check_the_cli(*scanned)
    _check_the_web(*scanned)


def _check_the_cli(url: str, shas: dict[str, str]) -> None:
    rows = _json_rows(url)
    assert {r["sha256"]: r["status"] for r in rows} == dict.fromkeys(shas.values(), "scored")
    assert {r["sha256"]: r["study_date"] for r in rows} == {shas[k]: v for k, v in EXPECTED.items()}
    with get_engine(url).connect() as connection:
        stored = dict(connection.execute(select(Image.sha256, Image.study_date)).all())
    assert stored[shas["dated"]] == date(2024, 3, 5) and stored[shas["impossible"]] is None

    one_day = _json_rows(url, "--study-date-from", "2024-03-05", "--study-date-to", "2024-03-05")
    assert [r["sha256"] for r in one_day] == [shas["dated"]], "both ends are inclusive"
    assert [r["sha256"] for r in _json_rows(url, "--study-date-to", "2000-01-01")] == [shas["acr_nema"]]
    assert _json_rows(url, "--study-date-from", "2024-03-06") == []
    since_1990 = {r["sha256"] for r in _json_rows(url, "--study-date-from", "1990-01-01")}
    assert since_1990 == {shas["dated"], shas["acr_nema"]}, "films without a date are in no range"
    table = cli("worklist", "--database-url", url)
    assert table.returncode == 0 and "study date" in table.stdout and "2024-03-05" in table.stdout
    bad = cli("worklist", "--study-date-from", "05/03/2024", "--database-url", url)
    assert bad.returncode == 2


def _token(client: TestClient) -> str:
    client.post("/login", data={"username": "reader", "password": PASSWORD}, headers=ORIGIN)
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)


def _page_shas(html: str) -> list[str]:
    return re.findall(r'data-sha256="([0-9a-f]{64})"', html)


def _check_the_web(url: str, shas: dict[str, str]) -> None:
    with session_scope(url) as session:
        add_user(session, "reader", PASSWORD, "reviewer")
    app = create_app(Settings.build(database_url=url))
    with TestClient(app, raise_server_exceptions=False) as client:
        _check_the_api_and_pages(client, url, shas)


def _check_the_api_and_pages(client: TestClient, url: str, shas: dict[str, str]) -> None:
    token = _token(client)
    api = client.get("/api/worklist").json()
    assert [r["sha256"] for r in api] == [r["sha256"] for r in _json_rows(url)], "the CLI's rows"
    assert {r["sha256"]: r["study_date"] for r in api} == {shas[k]: v for k, v in EXPECTED.items()}
    march = {"study_date_from": "2024-03-01", "study_date_to": "2024-03-31"}
    ranged = client.get("/api/worklist", params=march)
    assert [r["sha256"] for r in ranged.json()] == [shas["dated"]]
    assert client.get("/api/worklist", params={"study_date_from": "March"}).status_code == 422

    page = client.get("/").text
    assert "<th>Study date</th>" in page
    assert 'name="study_date_from"' in page and 'name="study_date_to"' in page
    row = re.search(rf'<tr data-sha256="{shas["dated"]}".*?</tr>', page, re.S).group(0)
    assert '<td class="study-date">2024-03-05</td>' in row
    film = client.get(f"/films/{shas['acr_nema']}").text
    assert '<dd id="study-date">1998-11-02</dd>' in film
    assert '<dd id="study-date">not recorded</dd>' in client.get(f"/films/{shas['jpeg']}").text

    form = {"csrf_token": token, "study_date_from": "1998-11-02", "study_date_to": "2024-03-04"}
    assert _page_shas(client.post("/rows", data=form, headers=ORIGIN).text) == [shas["acr_nema"]]
    bad = {"csrf_token": token, "study_date_to": "soon"}
    assert client.post("/rows", data=bad, headers=ORIGIN).status_code == 400
    exported = client.post("/export.csv", data={**form, "study_date_to": "2030-01-01"}, headers=ORIGIN)
    lines = list(csv.DictReader(io.StringIO(exported.text)))
    assert {r["sha256"]: r["study_date"] for r in lines} == {
        shas["dated"]: "2024-03-05",
        shas["acr_nema"]: "1998-11-02",
    }


# -- migration 0005 over existing rows --------------------------------------------------------------------


def _film(url: str, n: int, p: float) -> None:
    with session_scope(url) as session:
        image_id, _ = queue.register(session, FileSeen(f"/drop/film-{n}.dcm", 10, n), f"{n:064x}")
        queue.record_score(session, image_id, ScoreRecord("m1", p, 0.0, None, 0.2, 0.8))


def _old_film(url: str, n: int, p: float, at) -> None:
    """A scored film written by plain SQL, as the schema of 0004 takes it."""
    with get_engine(url).begin() as connection:
        image_id = connection.execute(
            text(
                "INSERT INTO images (sha256, status, attempts, size_bytes, out_of_scope, first_seen_at, "
                "updated_at) VALUES (:sha, 'scored', 1, 10, false, :at, :at) RETURNING id"
            ),
            {"sha": f"{n:064x}", "at": at},
        ).scalar_one()
        connection.execute(
            text(
                "INSERT INTO scores (image_id, model_version, pneumonia_probability, pneumonia_logit, "
                "screening_threshold, high_confidence_threshold, screening_positive, "
                "high_confidence_positive, created_at) VALUES (:id, 'm1', :p, 0, 0.2, 0.8, :s, :h, :at)"
            ),
            {"id": image_id, "p": p, "s": p >= 0.2, "h": p >= 0.8, "at": utcnow()},
        )


def _view_columns(url: str) -> list[str]:
    with get_engine(url).connect() as connection:
        return list(connection.execute(text("SELECT * FROM triage_worklist")).keys())


def _order(url: str) -> list[str]:
    """The worklist's order by plain SQL (the view of either revision)."""
    with get_engine(url).connect() as connection:
        query = text("SELECT sha256 FROM triage_worklist ORDER BY worklist_rank, sha256")
        return list(connection.execute(query).scalars())


def test_migration_0005_up_and_down_over_existing_rows(url):
    config = alembic_config(url)
    command.downgrade(config, "0004")
    assert "study_date" not in _view_columns(url)
    assert "study_date" not in {c["name"] for c in inspect(get_engine(url)).get_columns("images")}
    for n, p in enumerate((0.1, 0.9, 0.5)):  # films stored by the old schema
        _old_film(url, n, p, utcnow() - timedelta(minutes=n))

    upgrade(url)
    assert "study_date" in _view_columns(url)
    assert _order(url) == [f"{n:064x}" for n in (1, 2, 0)], "the old films, in their order"
    assert {c["name"] for c in inspect(get_engine(url)).get_indexes("images")} >= {"ix_images_study_date"}
    with session_scope(url) as session:
        assert {r["study_date"] for r in query_rows(session)} == {None}
        session.execute(update(Image).where(Image.sha256 == f"{2:064x}").values(study_date=date(2020, 1, 31)))
    with session_scope(url) as session:
        assert count_rows(session, WorklistFilter(study_date_from=date(2020, 1, 31))) == 1
    _film(url, 3, 0.95)  # the triggers are back
    assert _order(url)[0] == f"{3:064x}"

    command.downgrade(config, "0004")
    assert "study_date" not in _view_columns(url)
    assert "study_date" not in {c["name"] for c in inspect(get_engine(url)).get_columns("images")}
    assert _order(url) == [f"{n:064x}" for n in (3, 1, 2, 0)]
    _old_film(url, 4, 0.99, utcnow())  # 0004's triggers work again
    assert _order(url)[0] == f"{4:064x}"
    upgrade(url)
    assert _order(url)[0] == f"{4:064x}" and "study_date" in _view_columns(url)
    if url.startswith("sqlite"):  # migrations run with foreign keys off; the pool gets them back on
        with get_engine(url).connect() as connection:
            assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
