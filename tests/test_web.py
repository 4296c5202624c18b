"""Routes, roles and the security rules of the web worklist, with FastAPI's test client.

Real SQLite and PostgreSQL; real PNG files on disk, registered with their real SHA-256.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image as PILImage
from sqlalchemy import select

from db import queue
from db.audit import events
from db.engine import session_scope
from db.queue import FileSeen
from db.schema import Image, Review
from db.users import add_user, remove_user
from tests.conftest import score_record
from tests.web_helpers import cli
from worker.settings import Settings
from worker.web.app import create_app
from worker.web.auth import COOKIE

ORIGIN = {"Origin": "http://testserver"}
PASSWORD = "a long enough password"
PATIENT_ID = "MRN-0042-SECRET"


def _png(path: Path, seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = (np.linspace(0, 255, 256 * 256).reshape(256, 256) + rng.integers(0, 30, (256, 256))).clip(0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(pixels.astype(np.uint8), mode="L").save(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def site(url, tmp_path):
    """Three films on disk (one carries a patient id), scored; a reviewer, a viewer and an admin."""
    shas = []
    for n, p in enumerate((0.95, 0.4, 0.01)):
        path = tmp_path / "drop" / f"film{n}.png"
        sha = _png(path, n)
        with session_scope(url) as session:
            image_id, _ = queue.register(session, FileSeen(str(path), path.stat().st_size, n), sha)
            queue.record_score(
                session,
                image_id,
                score_record(p),
                {"patient_id": PATIENT_ID} if n == 0 else None,
            )
        shas.append(sha)
    with session_scope(url) as session:
        add_user(session, "reader", PASSWORD, "reviewer")
        add_user(session, "viewer", PASSWORD, "viewer")
        add_user(session, "boss", PASSWORD, "admin")
    return url, shas, tmp_path


@pytest.fixture
def client(site):
    url, _, _ = site
    app = create_app(Settings.build(database_url=url))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


def _sign_in(client: TestClient, username: str) -> str:
    response = client.post(
        "/login", data={"username": username, "password": PASSWORD}, headers=ORIGIN, follow_redirects=False
    )
    assert response.status_code == 303, response.text
    page = client.get("/")
    return re.search(r'name="csrf_token" value="([^"]+)"', page.text).group(1)


def _basic(username: str, password: str = PASSWORD) -> dict:
    return {"Authorization": "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()}


def test_nothing_but_login_healthz_and_static_without_signing_in(client, site):
    _, shas, _ = site
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/login").status_code == 200
    assert client.get("/static/htmx.min.js").status_code == 200
    for path in ("/", f"/films/{shas[0]}", "/model-card"):
        response = client.get(path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == "/login", path
    for path in (
        "/api/worklist",
        f"/api/films/{shas[0]}",
        f"/api/films/{shas[0]}/image.png",
        f"/api/films/{shas[0]}/heatmap.png",
        "/api/docs",
        "/api/openapi.json",
        "/docs",
        "/openapi.json",
    ):
        assert client.get(path).status_code in (401, 404), path
    assert client.get("/api/worklist").headers["www-authenticate"].startswith("Basic")
    assert client.post(f"/api/films/{shas[0]}/review", json={"decision": "agree"}).status_code == 401


def test_session_cookie_flags_and_sign_out(client):
    response = client.post(
        "/login", data={"username": "reader", "password": PASSWORD}, headers=ORIGIN, follow_redirects=False
    )
    cookie = response.headers["set-cookie"]
    assert f"{COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain http here; https requests get a Secure cookie
    token = re.search(r'name="csrf_token" value="([^"]+)"', client.get("/").text).group(1)
    out = client.post("/logout", data={"csrf_token": token}, headers=ORIGIN, follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/login"
    assert client.get("/", follow_redirects=False).status_code == 303


def test_worklist_rows_in_the_views_order_with_full_hashes(client, site):
    url, shas, _ = site
    _sign_in(client, "viewer")
    page = client.get("/").text
    assert re.findall(r'data-sha256="([0-9a-f]{64})"', page) == shas  # 0.95, 0.4, 0.01
    assert "HIGH" in page and "screen+" in page and PATIENT_ID in page
    api = client.get("/api/worklist").json()
    assert [row["sha256"] for row in api] == shas
    assert [row["sha256"] for row in client.get("/api/worklist?limit=1&offset=1").json()] == shas[1:2]
    assert client.get("/api/worklist?status=bogus").status_code == 400


def test_filters_search_and_csv_are_posted_not_in_the_url(client, site):
    _, shas, _ = site
    token = _sign_in(client, "viewer")
    form = {"csrf_token": token, "search": PATIENT_ID}
    rows = client.post("/rows", data=form, headers=ORIGIN).text
    assert re.findall(r'data-sha256="([0-9a-f]{64})"', rows) == shas[:1]
    rows = client.post("/rows", data={"csrf_token": token, "tier": "below"}, headers=ORIGIN).text
    assert re.findall(r'data-sha256="([0-9a-f]{64})"', rows) == shas[2:]
    csv_text = client.post("/export.csv", data={"csrf_token": token, "tier": "HIGH"}, headers=ORIGIN).text
    lines = csv_text.strip().splitlines()
    assert lines[0].startswith("path,sha256,status") and len(lines) == 2 and shas[0] in lines[1]
    assert (
        client.post(
            "/rows", data={"csrf_token": token, "arrived_from": "not-a-date"}, headers=ORIGIN
        ).status_code
        == 400
    )


def test_reviewer_agrees_and_the_film_leaves_the_top(client, site):
    url, shas, _ = site
    token = _sign_in(client, "reader")
    response = client.post(
        f"/films/{shas[0]}/review",
        data={"csrf_token": token, "decision": "agree"},
        headers=ORIGIN,
        follow_redirects=False,
    )
    assert response.status_code == 303
    assert re.findall(r'data-sha256="([0-9a-f]{64})"', client.get("/").text) == [shas[1], shas[2], shas[0]]
    api = client.post(
        f"/api/films/{shas[1]}/review",
        json={"decision": "disagree", "note": "clear lungs"},
        headers={**ORIGIN, "X-CSRF-Token": token},
    )
    assert api.status_code == 201 and api.json()["reader_label"] == "normal"
    with session_scope(url) as session:
        labels = {r.decision: r.reader_label for r in session.scalars(select(Review))}
        image = session.scalar(select(Image).where(Image.sha256 == shas[0]))
        assert image.reviewed_by == "reader"
    assert labels == {"agree": "pneumonia", "disagree": "normal"}


def test_a_viewer_cannot_review(client, site):
    _, shas, _ = site
    token = _sign_in(client, "viewer")
    page = client.get(f"/films/{shas[0]}").text
    assert 'id="agree"' not in page and "can look but not record reviews" in page
    assert "squashed to its 128 px square" in page  # the shipped model's input size, from its metadata
    form = client.post(
        f"/films/{shas[0]}/review", data={"csrf_token": token, "decision": "agree"}, headers=ORIGIN
    )
    assert form.status_code == 403
    api = client.post(
        f"/api/films/{shas[0]}/review", json={"decision": "agree"}, headers={**ORIGIN, "X-CSRF-Token": token}
    )
    assert api.status_code == 403
    basic = client.post(f"/api/films/{shas[0]}/review", json={"decision": "agree"}, headers=_basic("viewer"))
    assert basic.status_code == 403
    assert client.get("/api/worklist").json()[0]["reviewed_at"] is None


def test_http_basic_for_scripts(client, site):
    _, shas, _ = site
    client.cookies.clear()
    assert client.get("/api/worklist", headers=_basic("viewer")).status_code == 200
    assert client.get("/api/worklist", headers=_basic("viewer", "wrong password")).status_code == 401
    review = client.post(f"/api/films/{shas[2]}/review", json={"decision": "agree"}, headers=_basic("reader"))
    assert review.status_code == 201  # no cookie, so no CSRF token needed
    assert (
        client.get(f"/api/films/{shas[2]}", headers=_basic("viewer")).json()["reviews"][0]["username"]
        == "reader"
    )


def test_cross_site_and_token_less_posts_are_refused(client, site):
    _, shas, _ = site
    token = _sign_in(client, "reader")
    target = f"/films/{shas[0]}/review"
    evil = client.post(
        target, data={"csrf_token": token, "decision": "agree"}, headers={"Origin": "http://evil.example"}
    )
    assert evil.status_code == 403
    no_origin = client.post(target, data={"csrf_token": token, "decision": "agree"})
    assert no_origin.status_code == 403
    no_token = client.post(target, data={"decision": "agree"}, headers=ORIGIN)
    assert no_token.status_code == 403
    assert (
        client.post(
            "/login",
            data={"username": "reader", "password": PASSWORD},
            headers={"Origin": "http://evil.example"},
        ).status_code
        == 403
    )
    assert client.get("/api/worklist").json()[0]["reviewed_at"] is None


def test_sign_in_attempts_are_limited(client):
    for _ in range(4):
        wrong = client.post("/login", data={"username": "reader", "password": "nope nope"}, headers=ORIGIN)
        assert wrong.status_code == 401 and "Wrong user name or password" in wrong.text
    limited = client.post("/login", data={"username": "reader", "password": PASSWORD}, headers=ORIGIN)
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1


def test_security_headers_and_no_inline_script(client, site):
    _, shas, _ = site
    _sign_in(client, "reader")
    for path in ("/", f"/films/{shas[0]}", "/login", "/api/docs"):
        response = client.get(path)
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
        assert response.headers["x-content-type-options"] == "nosniff"
        scripts = re.findall(r"<script([^>]*)>(.*?)</script>", response.text, re.S)
        assert all('src="/static/' in attrs and not body.strip() for attrs, body in scripts), path
        assert " style=" not in response.text and "<style" not in response.text, path
        assert "cdn" not in response.text.lower()
    assert "/api/worklist" in client.get("/api/docs").text
    assert "/api/films/{sha256}/review" in client.get("/api/openapi.json").json()["paths"]


def test_film_pictures_and_a_replaced_file(client, site):
    _, shas, tmp_path = site
    _sign_in(client, "viewer")
    image = client.get(f"/api/films/{shas[0]}/image.png")
    assert image.headers["content-type"] == "image/png"
    assert PILImage.open(io.BytesIO(image.content)).size == (512, 512)
    thumb = client.get(f"/api/films/{shas[1]}/image.png?size=64")
    assert PILImage.open(io.BytesIO(thumb.content)).size == (64, 64)
    _png(tmp_path / "drop" / "film2.png", 99)  # the file is replaced by other content
    gone = client.get(f"/api/films/{shas[2]}/image.png")
    assert gone.status_code == 404 and gone.json() == {"detail": "the film is no longer at any known path"}
    assert client.get(f"/films/{'0' * 64}").status_code == 404
    assert client.get("/films/not-a-hash").status_code == 404


def test_audit_log_records_views_reviews_and_sign_ins(client, site):
    url, shas, _ = site
    token = _sign_in(client, "reader")
    client.get(f"/films/{shas[0]}")
    client.post(
        f"/films/{shas[0]}/review", data={"csrf_token": token, "decision": "disagree"}, headers=ORIGIN
    )
    with session_scope(url) as session:
        actions = [(e["username"], e["action"], e["sha256"]) for e in events(session)]
    assert ("reader", "sign_in", None) in actions
    assert ("reader", "view", shas[0]) in actions and ("reader", "review", shas[0]) in actions
    printed = cli("audit", "--since", "1h", "--json", "--database-url", url)
    assert printed.returncode == 0 and '"action": "review"' in printed.stdout


def test_a_review_from_the_command_line_is_audited_too(site):
    url, shas, _ = site
    done = cli("review", shas[1][:12], "--reviewer", "dr-cli", "--database-url", url)
    assert done.returncode == 0, done.stderr
    assert cli("review", shas[1], "--database-url", url).returncode == 1, "already reviewed: nothing to audit"
    with session_scope(url) as session:
        logged = events(session)
    reviews = [(e["username"], e["sha256"], e["detail"]) for e in logged if e["action"] == "review"]
    assert reviews == [("dr-cli", shas[1], "cli")]


def test_a_removed_user_is_signed_out_at_once(client, site):
    url, _, _ = site
    _sign_in(client, "viewer")
    assert client.get("/", follow_redirects=False).status_code == 200
    with session_scope(url) as session:
        remove_user(session, "viewer")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_access_log_and_errors_reveal_nothing(client, site, caplog):
    _, shas, _ = site
    token = _sign_in(client, "viewer")
    with caplog.at_level(logging.INFO, logger="cxr_triage.web"):
        client.get(f"/films/{shas[0]}")
        client.post("/rows", data={"csrf_token": token, "search": PATIENT_ID}, headers=ORIGIN)
        client.get(f"/api/films/{shas[0]}/image.png")
    logged = caplog.text
    assert PATIENT_ID not in logged and shas[0] not in logged and shas[0][:12] in logged
    assert "drop" not in logged
    bad = client.post(
        "/api/films/" + shas[0] + "/review", json={"decision": "maybe"}, headers=_basic("reader")
    )
    assert bad.status_code == 422 and "Traceback" not in bad.text and "maybe" not in bad.text


def test_users_commands(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    added = cli("users", "add", "dr-a", "--role", "admin", "--database-url", url, stdin="s3cret-passw0rd\n")
    assert added.returncode == 0, added.stderr
    assert cli("users", "add", "dr-a", "--database-url", url, stdin="s3cret-passw0rd\n").returncode == 2
    short = cli("users", "add", "dr-b", "--database-url", url, stdin="short\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    assert cli("users", "add", "bad name!", "--database-url", url, stdin="s3cret-passw0rd\n").returncode == 2
    listing = cli("users", "list", "--database-url", url)
    assert "dr-a" in listing.stdout and "admin" in listing.stdout and "s3cret" not in listing.stdout
    assert cli("users", "remove", "dr-a", "--database-url", url).returncode == 0
    assert cli("users", "remove", "dr-a", "--database-url", url).returncode == 1
    audit = cli("audit", "--since", "2000-01-01", "--database-url", url)
    assert "user_add" in audit.stdout and "user_remove" in audit.stdout
    assert cli("audit", "--since", "yesterday-ish", "--database-url", url).returncode == 2


def test_only_admins_manage_users_on_the_page(client, site):
    url, _, _ = site
    token = _sign_in(client, "reader")
    assert client.get("/admin/users").status_code == 403
    new = {"csrf_token": token, "username": "intruder", "role": "admin", "password": PASSWORD}
    assert client.post("/admin/users", data=new, headers=ORIGIN).status_code == 403
    client.cookies.clear()
    token = _sign_in(client, "boss")
    assert "reader" in client.get("/admin/users").text
    added = client.post(
        "/admin/users",
        data={**new, "csrf_token": token, "username": "nurse"},
        headers=ORIGIN,
        follow_redirects=False,
    )
    assert added.status_code == 303
    short = client.post(
        "/admin/users",
        data={**new, "csrf_token": token, "username": "x", "password": "short"},
        headers=ORIGIN,
    )
    assert short.status_code == 400 and "at least 8" in short.text
    removed = client.post(
        "/admin/users/viewer/remove", data={"csrf_token": token}, headers=ORIGIN, follow_redirects=False
    )
    assert removed.status_code == 303
    assert (
        client.post("/admin/users/boss/remove", data={"csrf_token": token}, headers=ORIGIN).status_code == 400
    )
    with session_scope(url) as session:
        changes = [(e["action"], e["detail"]) for e in events(session) if e["action"].startswith("user_")]
    assert changes == [("user_add", "nurse as admin"), ("user_remove", "viewer")]


def test_web_serves_its_own_metrics_and_readiness_without_patient_data(client, site):
    """Issue 14: the web process exposes /metrics and /readyz; the gauges come from the database."""
    from prometheus_client.parser import text_string_to_metric_families

    url, shas, _ = site
    response = client.get("/metrics")
    assert response.status_code == 200
    families = {family.name: family for family in text_string_to_metric_families(response.text)}
    unreviewed = families["cxr_triage_unreviewed_images"]
    assert sum(sample.value for sample in unreviewed.samples) == 3  # three scored films, none reviewed
    assert PATIENT_ID not in response.text and not any(sha in response.text for sha in shas)
    assert url.split("/")[-1] not in response.text  # no database name either
    ready = client.get("/readyz")
    assert ready.status_code in (200, 503) and "status" in ready.json()
