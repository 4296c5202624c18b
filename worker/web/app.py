"""The web worklist: pages for readers and a JSON API, over the same database view as the CLI.

Nothing but ``/login``, ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus: counts, no patient data,
no identifiers in labels) and ``/static`` is served without signing in. Pages are
rendered on the server (Jinja2); htmx (vendored under ``static/``) refreshes the rows in place.
No patient data goes into a URL (filters and searches are posted) or into the access log.
"""

from __future__ import annotations

import io
import logging
import re
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import text
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException as StarletteHTTPException

from db import audit
from db.audit import AuditAction
from db.engine import session_scope
from db.reviews import ReviewError, dismiss, record_review, reviews_of
from db.schema import Image, ReviewDecision, UserRole
from db.sites import site_names
from db.users import UserError, add_user, authenticate, list_users, remove_user
from db.web_sessions import SESSION_MAX_AGE_S, end_session, open_session, prune_expired
from db.worklist import (
    INTENDED_USE,
    TIERS,
    WAIT_TARGET_S,
    WorklistFilter,
    count_rows,
    film,
    query_rows,
    waited,
)
from db.worklist_csv import write_csv
from worker.logs import short
from worker.settings import Settings
from worker.web import auth
from worker.web.auth import COOKIE, Forbidden, NotSignedIn, Principal, TooManyAttempts, require
from worker.web.bulk import BulkReadAudit
from worker.web.images import (
    DISPLAY_SIZE,
    THUMB_SIZE,
    DecoderBusy,
    FilmUnavailable,
    cached_thumbnail,
    film_png,
    heatmap_png,
    lungs_png,
    make_thumbnails,
    model_input_png,
    thumbnail_png,
    view_png,
)

log = logging.getLogger("cxr_triage.web")
HERE = Path(__file__).resolve().parent
SHA256 = re.compile(r"^[0-9a-f]{64}$")
PAGE_SIZE = 50
MAX_API_LIMIT = 1000
#: Beyond any worklist's length, and small enough for every database's integer type.
MAX_OFFSET = 1_000_000_000
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)

Viewer = Annotated[Principal, Depends(require(UserRole.VIEWER))]
Reviewer = Annotated[Principal, Depends(require(UserRole.REVIEWER))]
Admin = Annotated[Principal, Depends(require(UserRole.ADMIN))]


@dataclass
class WebState:
    settings: Settings
    database_url: str
    limiter: auth.SignInLimiter
    templates: Jinja2Templates
    bulk_audit: BulkReadAudit


def _state(request: Request) -> WebState:
    return request.app.state.web


# -- formatting helpers for the templates ------------------------------------------------------------


def _waited(row: dict, now: datetime) -> tuple[str, str]:
    """How long the film has waited and its style: within its tier's target, past it, or neither."""
    label, late = waited(row, now)
    if row["reviewed_at"] or row["tier"] is None:
        return label, "wait-none"
    return label, "wait-late" if late else "wait-ok"


def _folder(path: str | None) -> str:
    return str(Path(path).parent) if path else ""


def _file_name(row: dict) -> str:
    """What names the film in a row: its file name; for DICOM content with no path left, its modality
    and view (the object's own name for a reader)."""
    if row.get("path"):
        return Path(row["path"]).name
    if row.get("source_format") == "dicom":
        return " ".join(v for v in ("DICOM", row.get("modality"), row.get("view_position")) if v)
    return ""


def viewer_link(template: str | None, row: dict) -> str | None:
    """The study in the hospital's viewer (``viewer_url`` with ``{study_uid}`` filled in), for DICOM
    films with a StudyInstanceUID; None otherwise (PNG/JPEG films have no study to open)."""
    if not template or not row.get("study_uid") or row.get("source_format") != "dicom":
        return None
    return template.replace("{study_uid}", quote(row["study_uid"], safe=""))


#: What to do next about a film that has no score, by the start of its reason (first match wins).
NEXT_STEPS = (
    ("file of", "The file is larger than the limit: export a smaller (compressed) image and resend."),
    ("truncated", "Truncated file: ask the modality or PACS to resend the study."),
    ("corrupt", "The file is damaged: ask the modality or PACS to resend the study."),
    ("cannot decode", "This worker cannot decode the image: open it in the PACS viewer and read it there."),
    ("transfer syntax", "This worker cannot decode the image: open it in the PACS viewer and read it there."),
    ("lateral view", "A lateral film: nothing for the model to score; read it with the frontal film."),
    ("body part", "Not a chest radiograph: nothing to read here."),
    ("modality", "Not a chest radiograph: nothing to read here."),
    ("veterinary", "Not a human radiograph: nothing to read here."),
    ("DICOM object has no pixel data", "Not an image (a report or other object): nothing to read here."),
    ("not a DICOM", "Not an image file: nothing to read here."),
    ("colour image", "A colour image, not a radiograph: check what was sent."),
    ("image too small", "Too small to read: ask for the original film."),
    ("out of distribution", "Not like the films the model knows: read it without the model."),
    ("rotated, upside down", "The film looks turned or inverted: ask for it to be re-sent upright."),
    ("no lung fields", "No lung fields found: not a frontal chest radiograph, nothing for the model here."),
    ("file disappeared", "The file was moved or deleted before it was read: send it again if needed."),
    ("no permission", "The worker may not read the file: ask the administrator to fix its permissions."),
)
DEFAULT_NEXT_STEP = "The model gave no score: read this film as you would without the model."


def next_step(reason: str | None) -> str:
    text_ = (reason or "").lower()
    for start, advice in NEXT_STEPS:
        if start.lower() in text_:
            return advice
    return DEFAULT_NEXT_STEP


#: Worklist columns that collapse when no row of the page has a value in them.
OPTIONAL_COLUMNS = {
    "patient": lambda r: r["patient_name"] or r["patient_id"],
    "accession": lambda r: r["accession_number"],
    "study_date": lambda r: r["study_date"],
    "view": lambda r: r["view_position"],
    "scope": lambda r: r["out_of_scope"],
    "reviewed": lambda r: r["reviewed_at"],
    "pacs": lambda r: r.get("viewer_link"),
}


def _templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(intended_use=INTENDED_USE, tiers=TIERS, wait_targets=WAIT_TARGET_S)
    templates.env.filters.update(folder=_folder)
    return templates


def _page(request: Request, name: str, context: dict, status_code: int = 200) -> HTMLResponse:
    return _state(request).templates.TemplateResponse(request, name, context, status_code=status_code)


# -- filters from a posted form ---------------------------------------------------------------------------


def _optional(form, name: str) -> str | None:
    value = form.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


def _flag(value: str | None) -> bool | None:
    return {"yes": True, "no": False}.get(value or "")


def _date(value: str | None) -> date | None:
    return date.fromisoformat(value) if value else None


def filters_from(form) -> tuple[WorklistFilter, int]:
    """The reader's filters and page offset from the posted filter form (ValueError when bad)."""
    wanted = WorklistFilter(
        status=_optional(form, "status"),
        tier=_optional(form, "tier"),
        reviewed=_flag(_optional(form, "reviewed")),
        out_of_scope=_flag(_optional(form, "out_of_scope")),
        folder=_optional(form, "folder"),
        arrived_from=_date(_optional(form, "arrived_from")),
        arrived_to=_date(_optional(form, "arrived_to")),
        study_date_from=_date(_optional(form, "study_date_from")),
        study_date_to=_date(_optional(form, "study_date_to")),
        search=_optional(form, "search"),
        site=_optional(form, "site"),
    )
    offset = int(_optional(form, "offset") or 0)
    if not 0 <= offset <= MAX_OFFSET:
        raise ValueError("offset out of range")
    return wanted, offset


def _rows_context(request: Request, wanted: WorklistFilter, offset: int) -> dict:
    with session_scope(_state(request).database_url) as session:
        rows = query_rows(session, wanted, limit=PAGE_SIZE, offset=offset)
        total = count_rows(session, wanted)
    now = datetime.now(UTC)
    template = _viewer_template(request)
    for row in rows:
        row["waited"], row["wait_class"] = _waited(row, now)
        row["file_name"] = _file_name(row)
        row["viewer_link"] = viewer_link(template, row)
    make_thumbnails([(r["sha256"], _ordered_paths(r)) for r in rows if r["status"] == "scored"])
    shown = {name: any(has(r) for r in rows) for name, has in OPTIONAL_COLUMNS.items()}
    shown["site"] = len({r.get("site") for r in rows}) > 1  # a single site is not said on every row
    models = sorted({(r["model_version"], r["calibration"] or "") for r in rows if r["model_version"]})
    return {
        "rows": rows,
        "shown": shown,
        "models": models,
        "total": total,
        "offset": offset,
        "page_size": PAGE_SIZE,
        "refreshed": now.strftime("%H:%M:%S UTC"),
    }


def _viewer_template(request: Request) -> str | None:
    return _state(request).settings.viewer_url


def _model_input_facts(request: Request) -> dict:
    """What the film page says of the model's input: whether it reads the lung crop (its folder ships
    a lung model, so the page offers the lung outline) and its input size in pixels."""
    import json

    path = _state(request).settings.resolved_model_dir() / "metadata.json"
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError):
        return {"lungs": False, "input_size": None}
    return {
        "lungs": (metadata.get("crop") or {}).get("kind") == "lungs",
        "input_size": metadata.get("input_size"),
    }


# -- pages ---------------------------------------------------------------------------------------------------

pages = APIRouter(include_in_schema=False)


@pages.get("/healthz")
def healthz(request: Request) -> JSONResponse:
    try:
        with session_scope(_state(request).database_url) as session:
            session.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - report unhealthy, say nothing internal
        return JSONResponse({"status": "database unavailable"}, status_code=503)
    return JSONResponse({"status": "ok"})


@pages.get("/login")
def login_form(request: Request) -> Response:
    return _page(request, "login.html", {"error": None})


async def _posted_form(request: Request) -> FormData:
    """The posted form, read on the event loop so that the endpoint itself can run in the thread pool."""
    return await request.form()


PostedForm = Annotated[FormData, Depends(_posted_form)]


def _sign_in(state: WebState, username: str, password: str) -> str | None:
    """A new session's token for the right password, else None (argon2: in the thread pool)."""
    user = authenticate(state.database_url, username, password)  # holds no connection while hashing
    with session_scope(state.database_url) as session:
        audit.record(session, AuditAction.SIGN_IN if user else AuditAction.SIGN_IN_FAILED, username)
        if user is None:
            return None
        prune_expired(session)
        token, _ = open_session(session, user.id)
    return token


@pages.post("/login")
def login(request: Request, form: PostedForm) -> Response:
    if not auth.same_origin(request):
        raise Forbidden("cross-site request refused")
    username = str(form.get("username") or "")[:64]
    password = str(form.get("password") or "")[:1024]
    state = _state(request)
    address = auth.client_address(request)
    state.limiter.check(address, username)
    token = _sign_in(state, username, password)
    if token is None:
        state.limiter.failed(address, username)
        return _page(request, "login.html", {"error": "Wrong user name or password."}, status_code=401)
    state.limiter.succeeded(address, username)
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_MAX_AGE_S,
        httponly=True,
        samesite="strict",
        secure=auth.cookie_secure(request),
        path="/",
    )
    return response


@pages.post("/logout")
def logout(request: Request, who: Viewer) -> Response:
    with session_scope(_state(request).database_url) as session:
        if who.via_session:
            end_session(session, request.cookies.get(COOKIE, ""))
        audit.record(session, AuditAction.SIGN_OUT, who.username)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@pages.get("/")
def worklist_page(request: Request, who: Viewer) -> Response:
    context = _rows_context(request, WorklistFilter(), 0)
    with session_scope(_state(request).database_url) as session:
        sites = site_names(session)
    return _page(request, "worklist.html", {"who": who, "statuses": _statuses(), "sites": sites, **context})


def _statuses() -> list[str]:
    from db.schema import ImageStatus

    return [s.value for s in ImageStatus]


async def _form_filters(request: Request) -> tuple[WorklistFilter, int]:
    """The worklist filter and page offset posted by the page's form (400 when one is invalid)."""
    try:
        return filters_from(await request.form())
    except (ValueError, OverflowError) as exc:
        raise StarletteHTTPException(400, "invalid filter") from exc


FormFilters = Annotated[tuple[WorklistFilter, int], Depends(_form_filters)]


@pages.post("/rows")
def worklist_rows(request: Request, who: Viewer, posted: FormFilters) -> Response:
    wanted, offset = posted
    return _page(request, "_rows.html", {"who": who, **_rows_context(request, wanted, offset)})


@pages.post("/export.csv")
def export_csv(request: Request, who: Viewer, posted: FormFilters) -> Response:
    wanted, _ = posted
    state = _state(request)
    with session_scope(state.database_url) as session:
        rows = query_rows(session, wanted)
        audit.record(session, AuditAction.EXPORT, who.username, detail=f"{len(rows)} rows (csv)")
    buffer = io.StringIO()
    write_csv(rows, buffer)
    return Response(
        buffer.getvalue(),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="worklist.csv"'},
    )


def _film_or_404(session, sha256: str) -> dict:
    if not SHA256.match(sha256):
        raise StarletteHTTPException(404)
    row = film(session, sha256)
    if row is None:
        raise StarletteHTTPException(404)
    return row


def _image_id(session, sha256: str) -> int | None:
    from sqlalchemy import select

    return session.scalar(select(Image.id).where(Image.sha256 == sha256))


@pages.get("/films/{sha256}")
def film_page(request: Request, sha256: str, who: Viewer) -> Response:
    with session_scope(_state(request).database_url) as session:
        row = _film_or_404(session, sha256)
        reviews = reviews_of(session, sha256)
        audit.record(session, AuditAction.VIEW, who.username, _image_id(session, sha256), "page")
    row["waited"], row["wait_class"] = _waited(row, datetime.now(UTC))
    row["file_name"] = _file_name(row)
    row["viewer_link"] = viewer_link(_viewer_template(request), row)
    context = {
        "who": who,
        "film": row,
        "reviews": reviews,
        "can_review": who.can(UserRole.REVIEWER),
        "next_step": None if row["status"] == "scored" else next_step(row["reason"]),
        **_model_input_facts(request),
    }
    return _page(request, "film.html", context)


@pages.post("/films/{sha256}/dismiss")
def dismiss_form(request: Request, sha256: str, who: Reviewer) -> Response:
    """A reviewer has dealt with a film that has no score (rejected, failed): it leaves the top."""
    with session_scope(_state(request).database_url) as session:
        _film_or_404(session, sha256)
        try:
            image_id = dismiss(session, sha256, who.username)
        except ReviewError as exc:
            raise StarletteHTTPException(409, str(exc)) from exc
        audit.record(session, AuditAction.REVIEW, who.username, image_id, "dismissed")
    return RedirectResponse("/", status_code=303)


@pages.post("/films/{sha256}/review")
def review_form(request: Request, sha256: str, who: Reviewer, form: PostedForm) -> Response:
    try:
        decision = ReviewDecision(str(form.get("decision")))
    except ValueError:
        return PlainTextResponse("decision must be agree or disagree", status_code=400)
    _review(request, sha256, who, decision, str(form.get("note") or ""))
    return RedirectResponse("/", status_code=303)


def _review(request: Request, sha256: str, who: Principal, decision: ReviewDecision, note: str) -> dict:
    with session_scope(_state(request).database_url) as session:
        _film_or_404(session, sha256)
        try:
            review = record_review(session, sha256, who.username, decision, note)
        except ReviewError as exc:
            raise StarletteHTTPException(409, str(exc)) from exc
        audit.record(session, AuditAction.REVIEW, who.username, review.image_id, decision.value)
        return {
            "sha256": sha256,
            "decision": review.decision,
            "reader_label": review.reader_label,
            "note": review.note,
            "model_version": review.model_version,
            "score": review.score,
            "username": review.username,
            "created_at": review.created_at.isoformat(),
        }


@pages.get("/quality")
def quality_page(
    request: Request,
    who: Reviewer,
    site: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[date | None, Query()] = None,
) -> Response:
    """Per site: weekly counts, flagged shares, review agreement and the drift verdict (db/quality.py)."""
    from db.quality import quality_report
    from worker.outcomes import classify
    from worker.web.charts import score_histogram, weekly_flagged

    with session_scope(_state(request).database_url) as session:
        sites = site_names(session)
        report = quality_report(
            session, site=site or None, since=since, classify=lambda reason: classify(reason).value
        )
    for part in report["sites"]:
        calibration = part["calibration"]
        thresholds = (
            (calibration["screening_threshold"], calibration["high_confidence_threshold"])
            if calibration
            else None
        )
        part["flagged_chart"] = weekly_flagged(part["weeks"], f"Weekly share flagged at site {part['site']}")
        part["histogram_chart"] = score_histogram(
            part["histogram"]["recent"],
            part["histogram"]["calibration_sample"],
            thresholds,
            f"Scores at site {part['site']}: last 7 days against the calibration sample",
        )
    context = {"who": who, "report": report, "sites": sites, "chosen": site or "", "since": report["since"]}
    return _page(request, "quality.html", context)


@pages.get("/model-card")
def model_card(request: Request, who: Viewer) -> Response:
    path = _state(request).settings.resolved_model_dir() / "MODEL_CARD.md"
    body = path.read_text(encoding="utf-8") if path.is_file() else "No model card ships with this model."
    return PlainTextResponse(body)


@pages.get("/admin/users")
def users_page(request: Request, who: Admin) -> Response:
    return _users_page(request, who, None)


def _users_page(request: Request, who: Principal, message: str | None, status_code: int = 200) -> Response:
    with session_scope(_state(request).database_url) as session:
        users = [(u.username, u.role, u.created_at) for u in list_users(session)]
    context = {"who": who, "users": users, "roles": [r.value for r in UserRole], "message": message}
    return _page(request, "users.html", context, status_code=status_code)


@pages.post("/admin/users")
def users_add(request: Request, who: Admin, form: PostedForm) -> Response:
    name, role = str(form.get("username") or ""), str(form.get("role") or "")
    try:
        with session_scope(_state(request).database_url) as session:
            add_user(session, name, str(form.get("password") or ""), UserRole(role))
            audit.record(session, AuditAction.USER_ADD, who.username, detail=f"{name} as {role}")
    except (UserError, ValueError) as exc:
        return _users_page(request, who, str(exc) if isinstance(exc, UserError) else "unknown role", 400)
    return RedirectResponse("/admin/users", status_code=303)


@pages.post("/admin/users/{username}/remove")
def users_remove(request: Request, username: str, who: Admin) -> Response:
    if username == who.username:
        return _users_page(request, who, "you cannot remove yourself", 400)
    try:
        with session_scope(_state(request).database_url) as session:
            remove_user(session, username)
            audit.record(session, AuditAction.USER_REMOVE, who.username, detail=username)
    except UserError as exc:
        return _users_page(request, who, str(exc), 404)
    return RedirectResponse("/admin/users", status_code=303)


# -- JSON API ------------------------------------------------------------------------------------------------

api = APIRouter(prefix="/api")


class ReviewIn(BaseModel):
    decision: ReviewDecision
    note: str | None = Field(None, max_length=2000)


@api.get("/worklist", summary="Worklist rows, most urgent first (the rows of `worklist --format json`)")
def api_worklist(
    request: Request,
    who: Viewer,
    status: Annotated[str | None, Query(description="Only rows in this state")] = None,
    study_date_from: Annotated[date | None, Query(description="Only studies from this day")] = None,
    study_date_to: Annotated[date | None, Query(description="Only studies up to this day, inclusive")] = None,
    site: Annotated[str | None, Query(description="Only films of this site")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_API_LIMIT)] = PAGE_SIZE,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> list[dict]:
    try:
        wanted = WorklistFilter(
            status=status, study_date_from=study_date_from, study_date_to=study_date_to, site=site
        )
    except ValueError as exc:
        raise StarletteHTTPException(400, f"invalid filter: {exc}") from exc
    with session_scope(_state(request).database_url) as session:
        rows = query_rows(session, wanted, limit=limit, offset=offset)
        # Every API read of rows is a read of patient data by a script: one audit row per call.
        detail = f"api worklist: {len(rows)} rows (limit {limit}, offset {offset})"
        audit.record(session, AuditAction.LIST, who.username, detail=detail)
    return rows


@api.get("/films/{sha256}", summary="One film's worklist row and its reviews")
def api_film(request: Request, sha256: str, who: Viewer) -> dict:
    with session_scope(_state(request).database_url) as session:
        row = _film_or_404(session, sha256)
        row["reviews"] = [
            {
                "username": r.username,
                "decision": r.decision,
                "reader_label": r.reader_label,
                "note": r.note,
                "created_at": r.created_at.isoformat(),
            }
            for r in reviews_of(session, sha256)
        ]
        audit.record(session, AuditAction.VIEW, who.username, _image_id(session, sha256), "api")
    return row


def _png_response(render) -> Response:
    try:
        body = render()
    except FilmUnavailable as exc:
        raise StarletteHTTPException(404, "the film is no longer at any known path") from exc
    except DecoderBusy as exc:
        raise StarletteHTTPException(503, "busy decoding other films: try again") from exc
    return Response(body, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def _stored_paths(request: Request, sha256: str, who: Principal, picture: str) -> list[str]:
    """The film's paths, newest first; the read is audited (once per user, film and picture a while)."""
    state = _state(request)
    with session_scope(state.database_url) as session:
        row = _film_or_404(session, sha256)
        if state.bulk_audit.due(who.username, sha256, picture):
            audit.record(session, AuditAction.VIEW, who.username, _image_id(session, sha256), picture)
    return _ordered_paths(row)


def _ordered_paths(row: dict) -> list[str]:
    """Where a film was seen, the most recent path first."""
    ordered = [row["path"]] if row["path"] else []
    return ordered + [p for p in row["paths"] if p != row["path"]]


@api.get("/films/{sha256}/image.png", summary="The film as the model saw it (square), as PNG")
def api_image(
    request: Request,
    sha256: str,
    who: Viewer,
    size: Annotated[int, Query(ge=THUMB_SIZE, le=1024)] = DISPLAY_SIZE,
) -> Response:
    paths = _stored_paths(request, sha256, who, "thumbnail" if size <= THUMB_SIZE else "image")
    return _png_response(lambda: film_png(sha256, paths, size))


@api.get("/films/{sha256}/view.png", summary="The film for reading: true aspect ratio, up to 2048 px, as PNG")
def api_view(request: Request, sha256: str, who: Viewer) -> Response:
    paths = _stored_paths(request, sha256, who, "image")
    return _png_response(lambda: view_png(sha256, paths))


@api.get("/films/{sha256}/thumb.png", summary="A thumbnail of the film (aspect ratio kept), as PNG")
def api_thumb(request: Request, sha256: str, who: Viewer) -> Response:
    made = cached_thumbnail(sha256) if SHA256.match(sha256) else None
    if made is not None:  # made earlier from this very content (the hash was checked then)
        return Response(made, media_type="image/png", headers={"Cache-Control": "private, max-age=86400"})
    paths = _stored_paths(request, sha256, who, "thumbnail")
    return _png_response(lambda: thumbnail_png(sha256, paths))


@api.get("/films/{sha256}/input.png", summary="What the model saw (its square input, or lung crop), as PNG")
def api_input(request: Request, sha256: str, who: Viewer) -> Response:
    paths = _stored_paths(request, sha256, who, "image")
    model_dir = _state(request).settings.resolved_model_dir()
    return _png_response(lambda: model_input_png(sha256, paths, model_dir, 128))


@api.get(
    "/films/{sha256}/heatmap.png",
    summary="Class activation overlay at the film's aspect ratio (research visualisation, not a diagnosis)",
)
def api_heatmap(request: Request, sha256: str, who: Viewer) -> Response:
    paths = _stored_paths(request, sha256, who, "heatmap")
    model_dir = _state(request).settings.resolved_model_dir()
    return _png_response(lambda: heatmap_png(sha256, paths, model_dir))


@api.get("/films/{sha256}/lungs.png", summary="Outline of the lung fields (models that read the lung crop)")
def api_lungs(request: Request, sha256: str, who: Viewer) -> Response:
    paths = _stored_paths(request, sha256, who, "image")
    model_dir = _state(request).settings.resolved_model_dir()

    def render() -> bytes:
        body = lungs_png(sha256, paths, model_dir)
        if body is None:
            raise StarletteHTTPException(404, "this model has no lung fields")
        return body

    return _png_response(render)


@api.post("/films/{sha256}/review", status_code=201, summary="Record Agree / Disagree (reviewers)")
def api_review(request: Request, sha256: str, body: ReviewIn, who: Reviewer) -> dict:
    return _review(request, sha256, who, body.decision, body.note or "")


@api.get("/openapi.json", include_in_schema=False)
def api_openapi(request: Request, who: Viewer) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@api.get("/docs", include_in_schema=False)
def api_docs(request: Request, who: Viewer) -> Response:
    spec = request.app.openapi()
    return _page(request, "api_docs.html", {"who": who, "spec": spec})


# -- errors, headers, access log ------------------------------------------------------------------------


def _wants_json(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(NotSignedIn)
    async def _not_signed_in(request: Request, _exc: NotSignedIn) -> Response:
        if _wants_json(request):
            return JSONResponse(
                {"detail": "sign in required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Basic realm="cxr-triage"'},
            )
        if request.headers.get("hx-request"):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden) -> Response:
        if _wants_json(request):
            return JSONResponse({"detail": exc.message}, status_code=403)
        return PlainTextResponse(exc.message, status_code=403)

    @app.exception_handler(TooManyAttempts)
    async def _too_many(request: Request, exc: TooManyAttempts) -> Response:
        wait = max(int(exc.retry_after_s + 0.999), 1)
        message = f"too many failed sign-ins: wait {wait} s"
        headers = {"Retry-After": str(wait)}
        if _wants_json(request):
            return JSONResponse({"detail": message}, status_code=429, headers=headers)
        response = _page(request, "login.html", {"error": message.capitalize() + "."}, status_code=429)
        response.headers.update(headers)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        messages = {404: "not found", 405: "method not allowed"}
        shown = (400, 404, 409, 503)
        detail = exc.detail if exc.status_code in shown and isinstance(exc.detail, str) else None
        message = (
            detail if detail and detail != "Not Found" else messages.get(exc.status_code, "request refused")
        )
        if _wants_json(request):
            return JSONResponse({"detail": message}, status_code=exc.status_code)
        return PlainTextResponse(message, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        fields = sorted({".".join(str(p) for p in error.get("loc", ())[1:]) for error in exc.errors()})
        return JSONResponse({"detail": "invalid request", "fields": fields}, status_code=422)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> Response:
        # Outside the middleware (Starlette answers unhandled errors last): the headers are set here.
        log.error("internal error on %s: %s", _loggable_path(request), type(exc).__name__)
        return _secured(request, PlainTextResponse("internal error", status_code=500))


def _loggable_path(request: Request) -> str:
    """The path with any film hash shortened; query strings are never logged."""
    return re.sub(r"[0-9a-f]{64}", lambda m: short(m.group(0)), request.url.path)


def _secured(request: Request, response: Response) -> Response:
    """The security headers every answer carries (errors too)."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    if "cache-control" not in response.headers and not request.url.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-store"
    return response


def _install_middleware(app: FastAPI) -> None:
    @app.middleware("http")
    async def _headers_and_access_log(request: Request, call_next):
        started = time.perf_counter()
        response = _secured(request, await call_next(request))
        log.info(
            "%s %s %d %.0f ms",
            request.method,
            _loggable_path(request),
            response.status_code,
            (time.perf_counter() - started) * 1000,
        )
        return response


def _add_metrics_routes(app: FastAPI, settings: Settings) -> None:
    """``/metrics`` and ``/readyz`` of the web process (issue 14); the page's own ``/healthz`` stays."""
    from worker.metrics.server import starlette_routes

    routes = [route for route in starlette_routes(settings) if route.path != "/healthz"]
    app.router.routes.extend(routes)


def _warm_explainer(settings: Settings) -> None:
    """Make the first page's thumbnails and load the serving model in the background, so that the
    first page and the first heat map toggle do not wait for them."""
    import threading

    from worker.web.images import explainer

    def load() -> None:
        try:
            with session_scope(settings.database_url) as session:
                rows = query_rows(session, WorklistFilter(), limit=PAGE_SIZE)
            make_thumbnails([(r["sha256"], _ordered_paths(r)) for r in rows if r["status"] == "scored"])
            _ = explainer(settings.resolved_model_dir()).scorer
        except Exception as exc:  # noqa: BLE001 - the heat map says it is unavailable when asked
            log.warning(
                "the heat map model or the first thumbnails could not be made: %s", type(exc).__name__
            )

    threading.Thread(target=load, name="explainer-warm-up", daemon=True).start()


def create_app(settings: Settings) -> FastAPI:
    """The web application for ``settings.database_url`` (the schema must be current)."""
    app = FastAPI(
        title="cxr-triage worklist API",
        description=INTENDED_USE,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.web = WebState(
        settings=settings,
        database_url=settings.database_url,
        limiter=auth.SignInLimiter(),
        templates=_templates(),
        bulk_audit=BulkReadAudit(),
    )
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(pages)
    app.include_router(api)
    _add_metrics_routes(app, settings)
    _warm_explainer(settings)
    _install_handlers(app)
    _install_middleware(app)
    return app
