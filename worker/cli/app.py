"""``cxr-triage``: scan folders, watch drop folders, run workers, read the worklist."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
import time
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from db.engine import masked
from db.schema import ImageStatus
from pipeline.extras import ExtraMissing, missing_extra_message
from pipeline.model_folder import Engine
from worker import logs, metrics
from worker.cli.dicom_commands import SendHeatmap, SendKeyObject, SendResults, check_results  # issue 11
from worker.cli.options import ModelDir, setting, with_options
from worker.cli.progress import progress_bar
from worker.cli.startup import command_settings as _settings
from worker.cli.startup import flags_of as _flags
from worker.cli.startup import prepare_database as _prepare_database
from worker.cli.startup import require_existing_database
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.scoring.decode_pool import DecodePool

log = logging.getLogger("cxr_triage")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=False)
#: Files counted for the scan's progress bar before scanning starts; a larger tree is not walked
#: twice (its total shows as "?" until the scan's own walk ends).
PROGRESS_COUNT_LIMIT = 50_000

app = typer.Typer(
    help="Pneumonia triage for chest radiographs: score DICOM/PNG/JPEG files and keep a "
    "prioritised worklist.\n\n"
    "Every option can also be set by its CXR_TRIAGE_* environment variable (shown with each option) "
    "or in an environment file named by CXR_TRIAGE_ENV_FILE.\n\n"
    "Research triage aid, not a diagnostic device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema management (Alembic).", no_args_is_help=True)


def package_version() -> str:
    """The installed package's version (importlib.metadata), as ``pip`` shows it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cxr-triage")
    except PackageNotFoundError:
        return "0+unknown"


def _model_line() -> str:
    """The model a command would load (``--model-dir`` / ``CXR_TRIAGE_MODEL_DIR``, else the shipped one)."""
    try:
        settings = Settings.build()
        folder = settings.resolved_model_dir()
        metadata = json.loads((folder / "metadata.json").read_text())
        return f"model {metadata.get('version', '?')} ({folder})"
    except Exception as exc:  # noqa: BLE001 - --version must answer whatever the model folder holds
        return f"model: unknown ({logs.describe_error(exc)})"


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
    verbose: Annotated[
        bool, typer.Option("-v", "--verbose", help="With --version: also the version of the model in use.")
    ] = False,
) -> None:
    if version:
        sys.stdout.write(f"cxr-triage {package_version()}\n")
        if verbose:
            sys.stdout.write(_model_line() + "\n")
        raise typer.Exit(0)
    if ctx.invoked_subcommand is None:
        out.print(ctx.get_help(), markup=False, highlight=False)
        raise typer.Exit(0)


app.add_typer(db_app, name="db")


DatabaseUrl = Annotated[str | None, setting("database_url")]
BrokerUrl = Annotated[str | None, setting("broker_url")]
LogLevel = Annotated[str | None, setting("log_level")]
BatchSize = Annotated[int | None, setting("batch_size", min=1, max=512)]
DecodeWorkers = Annotated[int | None, setting("decode_workers", min=0)]
FullResolution = Annotated[bool | None, setting("full_resolution_decode")]
InferenceEngine = Annotated[Engine | None, setting("inference_engine")]
FollowSymlinks = Annotated[bool | None, setting("follow_symlinks")]

MetricsPort = Annotated[int | None, setting("metrics_port", min=0, max=65535)]

# The options of every command that scores (scan, watch, worker), after each command's own.
SCORING_OPTIONS: dict[str, Any] = {
    "database_url": DatabaseUrl,
    "broker_url": BrokerUrl,
    "model_dir": ModelDir,
    "batch_size": BatchSize,
    "decode_workers": DecodeWorkers,
    "full_resolution_decode": FullResolution,
    "inference_engine": InferenceEngine,
    "results_destination": SendResults,
    "send_heatmap": SendHeatmap,
    "send_key_object": SendKeyObject,
    "log_level": LogLevel,
}


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = None, log_level: LogLevel = None) -> None:
    """Create the schema or migrate it to the newest revision."""
    settings = _settings(database_url=database_url, log_level=log_level)
    _prepare_database(settings)
    console.print(f"database {masked(settings.database_url)} is at the newest schema", markup=False)


def _check_model_or_exit(settings: Settings) -> None:
    """A model folder without metadata or weights stops here, before anything is registered; the
    model itself is loaded (and a corrupt one refused) before the first file is claimed."""
    from pipeline.model_folder import check_model_dir

    problem = check_model_dir(settings.resolved_model_dir())
    if problem:
        console.print(f"cannot load the model: {problem}", markup=False)
        raise typer.Exit(2)


def _resolve_roots(paths: list[Path]) -> list[str]:
    """Roots as real paths, as ``watch`` does: a root that is a symbolic link is followed (only the
    root; links below it follow --follow-symlinks)."""
    return [str(path.resolve()) for path in paths]


@app.command()
@with_options(SCORING_OPTIONS)
def scan(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders (searched recursively).", exists=True)
    ],
    follow_symlinks: FollowSymlinks = None,
    wait: Annotated[bool, typer.Option(help="With a broker: wait until every queued file is final.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    summary_json: Annotated[
        Path | None,
        typer.Option(
            help="Also write the summary as JSON to this file: files, scored, rejected, failed, skipped, "
            "duplicates, queued, elapsed_s, images_per_s."
        ),
    ] = None,
    **options: Any,
) -> None:
    """Score every supported file under PATHS that is not scored yet (a backlog scan).

    Files already known with the same path, size and modification time are skipped without being read;
    the same content under two paths is scored once. With a broker, files are queued for the workers.
    """
    from worker.scoring.decode_pool import DecodePool

    settings = _settings(**_flags(locals()), **options)
    # The decode processes start first, so that their own start-up overlaps this one's.
    with DecodePool(settings.decode_processes) as pool:
        pool.start()
        _scan_with(settings, pool, paths, wait=wait, progress=progress, summary_json=summary_json)


def _scan_with(
    settings: Settings,
    pool: DecodePool,
    paths: list[Path],
    *,
    wait: bool,
    progress: bool,
    summary_json: Path | None,
) -> None:
    """The body of :func:`scan`, with its decode pool."""
    from worker.ingest.scanner import ScanSummary, count_files
    from worker.queue.submit import InProcess, ViaCelery, broker_errors, wait_until_final
    from worker.queue.submit import scan as scan_roots

    _prepare_database(settings)
    check_results(settings)
    from worker.dicomnet.sender import start_results_sender

    results = start_results_sender(settings)
    roots = _resolve_roots(paths)
    console.print(f"database: {masked(settings.database_url)}", markup=False)
    # The bar's total: counted first only up to PROGRESS_COUNT_LIMIT files, so a large archive is not
    # walked twice before any work starts; beyond it the total shows as "?" until the scan's own
    # walk has found every file.
    per_root = {
        root: count_files([root], settings.follow_symlinks, limit=PROGRESS_COUNT_LIMIT + 1) for root in roots
    }
    counted = sum(per_root.values())
    for path, root in zip(paths, roots, strict=True):
        if per_root[root] == 0:
            console.print(f"nothing to score under {path}: no regular files found", markup=False)
    started = time.perf_counter()
    handed_on: list[int] = []
    summary = ScanSummary()
    submitter = None
    try:
        with progress_bar(console, progress) as bar:
            if settings.broker_url:
                submitter = ViaCelery(settings)
            else:
                _check_model_or_exit(settings)
                submitter = InProcess(settings, pool)
            task = bar.add_task("scanning", total=counted if counted <= PROGRESS_COUNT_LIMIT else None)
            try:
                advance = lambda n: bar.advance(task, n)  # noqa: E731
                scan_roots(
                    settings,
                    roots,
                    submitter,
                    pool,
                    on_progress=advance,
                    handed_on=handed_on,
                    summary=summary,
                )
                bar.update(task, total=summary.files)  # exact now (the count may have stopped early)
            except broker_errors() as exc:
                _broker_down(settings, exc)
            if settings.broker_url:
                console.print(f"enqueued {summary.outcomes.get('queued', 0)} image(s) for the workers")
                if wait and handed_on:
                    wait_task = bar.add_task("waiting for workers", total=len(handed_on))
                    counts = wait_until_final(
                        settings, handed_on, on_progress=lambda d: bar.update(wait_task, completed=d)
                    )
                    summary.outcomes.clear()
                    summary.outcomes.update(counts)
                else:
                    summary.outcomes["queued"] = len(handed_on)
    except KeyboardInterrupt:
        if isinstance(submitter, InProcess):  # the chunk being scored: its finished batches count
            summary.outcomes.update(submitter.unreported())
        _interrupted(summary, time.perf_counter() - started, results, summary_json)
    elapsed = time.perf_counter() - started
    _print_summary(summary, elapsed)
    report = results.close(drain_s=120.0)  # send the results of this scan before exiting (bounded wait)
    _print_results(report)
    if summary_json is not None:
        record = summary_record(summary, elapsed) | (report.as_dict() if report else {})
        summary_json.write_text(json.dumps(record, indent=2) + "\n")
    if counted == 0:
        raise typer.Exit(1)
    if report is not None and not report.delivered:
        raise typer.Exit(RESULTS_NOT_DELIVERED)


#: ``scan``'s exit status when films were scored but some results did not reach the destination.
RESULTS_NOT_DELIVERED = 3
#: Exit status after Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED = 130


def _interrupted(summary, elapsed: float, results, summary_json: Path | None) -> None:
    """Ctrl-C: say so, print the summary so far, stop the results sender, exit 130 (no traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
    console.print("interrupted", markup=False)
    _print_summary(summary, elapsed)
    report = results.close()
    _print_results(report)
    if summary_json is not None:
        record = (
            summary_record(summary, elapsed) | (report.as_dict() if report else {}) | {"interrupted": True}
        )
        summary_json.write_text(json.dumps(record, indent=2) + "\n")
    raise typer.Exit(INTERRUPTED)


def _print_results(report) -> None:
    """The outbox's part of the summary: what this run delivered, failed for good, left pending."""
    if report is None:
        return
    line = f"results: {report.sent} sent, {report.failed} failed, {report.pending} pending"
    if report.failed:
        line += " (see: cxr-triage outbox list --status failed)"
    if report.pending:
        line += " (the next watch, scan or worker sends them)"
    console.print(line if report.delivered else f"[yellow]{line}[/yellow]", markup=not report.delivered)


def _broker_down(settings: Settings, exc: BaseException) -> None:
    console.print(
        f"cannot reach the broker {masked(settings.broker_url or '')}: {logs.describe_error(exc)} -- "
        "files registered so far are kept, and the next run sends what was not sent",
        markup=False,
    )
    raise typer.Exit(1) from None


def summary_record(summary, elapsed: float) -> dict:
    """The machine-readable summary (``scan --summary-json``); the benches read exactly these keys."""
    outcomes = summary.outcomes
    processed = sum(outcomes.get(k, 0) for k in ("scored", "rejected", "failed", "superseded"))
    return {
        "files": summary.files,
        "scored": outcomes.get("scored", 0),
        "rejected": outcomes.get("rejected", 0),
        "failed": outcomes.get("failed", 0),
        "skipped": summary.skipped,
        "duplicates": summary.duplicates,
        "queued": outcomes.get("queued", 0) + outcomes.get("unreachable", 0),
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(processed / elapsed, 3) if elapsed > 0 else 0.0,
    }


def _print_summary(summary, elapsed: float) -> None:
    record = summary_record(summary, elapsed)
    superseded = summary.outcomes.get("superseded", 0)
    console.print(
        f"{record['files']} files: {record['scored']} scored, {record['rejected']} rejected, "
        f"{record['failed']} failed, {record['skipped']} skipped (already known), "
        f"{record['duplicates']} duplicate content; {record['queued']} queued; "
        + (f"{superseded} no longer on disk; " if superseded else "")
        + f"{elapsed:.1f} s, {record['images_per_s']:.1f} images/s",
        markup=False,
    )
    if getattr(summary, "unreadable", 0):
        console.print(
            f"[yellow]{summary.unreadable} file(s) could not be read now (permission, share down, not a "
            "regular file): not registered; the next scan tries them again[/yellow]"
        )


#: Rows the table shows when no --limit is given.
TABLE_LIMIT = 50


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command()
def worklist(
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.table,
    limit: Annotated[
        int | None,
        typer.Option(help=f"Show at most N rows (default {TABLE_LIMIT} in the table; JSON/CSV: all).", min=1),
    ] = None,
    status: Annotated[ImageStatus | None, typer.Option(help="Only rows in this state.")] = None,
    study_date_from: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Only studies from this day (StudyDate).")
    ] = None,
    study_date_to: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="Only studies up to this day, inclusive.")
    ] = None,
    site: Annotated[
        str | None, typer.Option(help="Only films of this site (`cxr-triage sites list`).")
    ] = None,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Print the worklist, most urgent first (unreviewed likely pneumonia on top; see README for aging).

    Data goes to standard output, log lines to standard error (safe to pipe into jq). The rows are those
    of the database view: SELECT * FROM triage_worklist ORDER BY worklist_rank.
    """
    from db.engine import session_scope
    from db.worklist import INTENDED_USE, WorklistFilter, count_rows, query_rows

    settings = _settings(quiet=True, database_url=database_url, log_level=log_level)
    require_existing_database(settings)
    _prepare_database(settings)
    console.print(f"database: {masked(settings.database_url)}", markup=False, highlight=False)  # stderr
    wanted = WorklistFilter(
        status=None if status is None else status.value,
        study_date_from=study_date_from.date() if study_date_from else None,
        study_date_to=study_date_to.date() if study_date_to else None,
        site=site,
    )
    if limit is None and format is OutputFormat.table:
        limit = TABLE_LIMIT  # a terminal shows a screenful; JSON and CSV stay complete
    with session_scope(settings.database_url) as session:
        rows = query_rows(session, wanted, limit=limit)
        more = count_rows(session, wanted) - len(rows) if format is OutputFormat.table else 0
    if format is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif format is OutputFormat.csv:
        from db.worklist_csv import write_csv

        write_csv(rows, sys.stdout)  # formulas escaped for spreadsheets
    else:
        _print_table(rows)
        if more > 0:
            console.print(f"{more} more: --limit / --format json", markup=False)
        console.print(f"[dim]{INTENDED_USE}[/dim]")


def _film_label(row: dict) -> str:
    """What names a film in one table line: the patient's name where known, else the file's name;
    then why it has no score, or that it is out of scope."""
    name = row["patient_name"] or (Path(row["path"]).name if row["path"] else "?")
    if row["reason"]:
        return f"{name}: {row['reason']}"
    return f"{name} (out of scope)" if row["out_of_scope"] else name


#: The table's line: short hash, tier, score, waited, study date (58 columns), then the name or file.
TABLE_WIDTH = 80
_TABLE_FIXED = "{:<8}  {:<8}  {:>5}  {:>7}  {:<10}  "


def _cut(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, an ellipsis marking where it was cut."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "\u2026"


def _print_table(rows: list[dict]) -> None:
    """One line per film, at most 80 columns: short hash (for `review`), tier, score, waited (red past
    the tier's target on a terminal), study date, and the name or file cut with an ellipsis (JSON and
    CSV have everything)."""
    from datetime import UTC

    from rich.text import Text

    from db.worklist import waited

    now = datetime.now(UTC)
    fixed = len(_TABLE_FIXED.format("", "", "", "", ""))
    rest = TABLE_WIDTH - fixed
    out.print(Text(_TABLE_FIXED.format("sha", "tier", "score", "waited", "study date") + "name / file"))
    for row in rows:
        label, late = waited(row, now)
        line = _TABLE_FIXED.format(
            row["sha256"][:8],
            _cut(row["tier"] or row["status"], 8),
            "" if row["score"] is None else f"{row['score']:.3f}",
            label,
            row["study_date"] or "",
        )
        text = Text(line + _cut(_film_label(row), rest))
        if late:
            start = line.index(label, 26)
            text.stylize("red", start, start + len(label))
        out.print(text, no_wrap=True, crop=False)


@app.command()
def review(
    sha256: Annotated[
        str, typer.Argument(help="SHA-256 of the film, or a prefix of it naming one film (>= 8 hex digits).")
    ],
    reviewer: Annotated[str | None, typer.Option(help="Who reviewed it.")] = None,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Mark a film as reviewed: it leaves the top of the worklist."""
    from db import audit
    from db.engine import session_scope
    from db.queue import find_by_sha256, mark_reviewed
    from worker.cli.web_commands import operator_account

    settings = _settings(quiet=True, database_url=database_url, log_level=log_level)
    _prepare_database(settings)
    try:
        with session_scope(settings.database_url) as session:
            image_id = find_by_sha256(session, sha256)
            changed = mark_reviewed(session, sha256, reviewer) if image_id is not None else 0
            if changed:  # the audit log names who reviewed what, whichever way it was done
                who = reviewer or operator_account()
                audit.record(session, audit.AuditAction.REVIEW, who, image_id, "cli")
    except ValueError as exc:
        console.print(str(exc), markup=False)
        raise typer.Exit(2) from None
    if image_id is None:
        console.print(f"no film matches {sha256.strip().lower()}: nothing marked reviewed", markup=False)
        raise typer.Exit(1)
    if changed == 0:
        console.print("that film was already marked reviewed", markup=False)
        raise typer.Exit(1)
    console.print(f"{changed} film(s) marked reviewed")


@app.command()
def requeue(
    status: Annotated[
        ImageStatus, typer.Option(help="Put images in this final state back in the queue (e.g. failed).")
    ],
    reason: Annotated[
        str | None, typer.Option(help="Only images whose reason contains this text (plain, no wildcards).")
    ] = None,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Give failed (or rejected, superseded) images another go, e.g. after fixing a model directory.

    They are scored by the next `scan` of their folder, by a running `watch`, or at once by the
    workers when a broker is set.
    """
    from db import queue
    from db.engine import session_scope

    if status not in (ImageStatus.FAILED, ImageStatus.REJECTED, ImageStatus.SUPERSEDED):
        console.print("only failed, rejected or superseded images can be requeued", markup=False)
        raise typer.Exit(2)
    settings = _settings(database_url=database_url, broker_url=broker_url, log_level=log_level)
    _prepare_database(settings)
    with session_scope(settings.database_url) as session:
        ids = queue.requeue_by_status(session, status, reason)
    console.print(f"{len(ids)} image(s) put back in the queue")
    if ids and settings.broker_url:
        from worker.queue.submit import broker_errors, send_batches

        try:
            send_batches(settings, ids)
        except broker_errors() as exc:
            _broker_down(settings, exc)
        console.print(f"sent {len(ids)} image(s) to the workers")


@app.command()
@with_options(SCORING_OPTIONS)
def watch(
    paths: Annotated[list[Path], typer.Argument(help="Drop folders to watch (created if missing).")],
    polling: Annotated[bool | None, setting("polling")] = None,
    stable_seconds: Annotated[float | None, setting("stable_seconds", min=0)] = None,
    batch_wait: Annotated[float | None, setting("batch_wait", min=0)] = None,
    rescan_interval: Annotated[float | None, setting("rescan_interval")] = None,
    follow_symlinks: FollowSymlinks = None,
    metrics_port: MetricsPort = None,
    **options: Any,
) -> None:
    """Watch drop folders; score new files in this process, or queue them when a broker is set."""
    from worker.ingest.watcher import Watcher

    settings = _settings(**_flags(locals()), **options)
    _prepare_database(settings)
    roots = _resolve_roots(paths)
    for path, root in zip(paths, roots, strict=True):
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            console.print(f"cannot create or open the drop folder {path}: {exc.strerror}", markup=False)
            raise typer.Exit(2) from None
    mode = f"queueing to {masked(settings.broker_url)}" if settings.broker_url else "scoring in this process"
    check_results(settings)
    from worker.dicomnet.sender import start_results_sender

    console.print(
        f"watching {len(roots)} folder(s), {mode}; database {masked(settings.database_url)}", markup=False
    )
    watcher = Watcher(settings, roots)
    metrics.for_watch(settings, roots, port=settings.metrics_port)
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop_event.set())
    started = time.perf_counter()
    results = start_results_sender(settings)
    with contextlib.suppress(KeyboardInterrupt):
        watcher.run()
    results.close()
    _print_summary(watcher.summary, time.perf_counter() - started)


@app.command("worker")
@with_options(SCORING_OPTIONS)
def worker_command(
    processes: Annotated[int | None, setting("processes", min=1)] = None,
    gpus: Annotated[str | None, setting("gpus")] = None,
    cpu_only: Annotated[bool | None, setting("cpu_only", "--cpu")] = None,
    lease_seconds: Annotated[float | None, setting("lease_seconds")] = None,
    metrics_port: MetricsPort = None,
    **options: Any,
) -> None:
    """Run Celery workers that score queued files (needs --broker-url / CXR_TRIAGE_BROKER_URL)."""
    from worker.queue.supervisor import Supervisor, WorkerSpec, visible_gpus

    settings = _settings(**_flags(locals()), **options)
    if not settings.broker_url:
        console.print("a broker is required: set --broker-url or CXR_TRIAGE_BROKER_URL", markup=False)
        raise typer.Exit(2)
    _check_model_or_exit(settings)
    _prepare_database(settings)
    gpu_ids = [] if settings.cpu_only else visible_gpus(settings.gpus)
    specs = [WorkerSpec(f"gpu{g}", g) for g in gpu_ids] or [
        WorkerSpec(f"cpu{i}", None) for i in range(settings.processes)
    ]
    if settings.decode_workers is None:  # share the cores among the worker processes
        settings = settings.with_changes(decode_workers=max(settings.decode_processes // len(specs), 1))
    console.print(
        f"{len(specs)} worker process(es) on {masked(settings.broker_url)}, "
        f"{settings.decode_processes} decode process(es) each; database {masked(settings.database_url)}",
        markup=False,
    )
    check_results(settings)
    from worker.dicomnet.sender import start_results_sender

    results = start_results_sender(settings)  # the supervisor sends; workers only create outbox rows
    supervisor = Supervisor(settings, specs)
    metrics.for_worker(settings, supervisor, port=settings.metrics_port)
    code = supervisor.run()
    results.close()
    raise typer.Exit(code)


def _register_optional_commands() -> None:
    try:
        from worker.cli.model_commands import explain_command, model_app
    except ImportError:  # model tooling not present in this build
        return
    app.add_typer(model_app, name="model")
    app.command("explain")(explain_command)


from worker.cli.dicom_commands import register as _register_dicom_commands  # noqa: E402

_register_dicom_commands(app)  # dicom-listen, outbox list|retry (issue 11)


_register_optional_commands()
from worker.cli.web_commands import register as _register_web_commands  # noqa: E402 - web, users, audit

_register_web_commands(app)
from worker.cli.site_commands import register as _register_site_commands  # noqa: E402 - sites, quality

_register_site_commands(app)


def main() -> None:
    """Entry point. Errors that reach here become one line on stderr: no traceback, and never the SQL
    parameters a database error carries (patient names, UIDs, paths)."""
    # Process-wide pydicom settings, set by the process entry (issue 15 item 4) before any thread can
    # import pydicom: a lazy first import raced in two threads (the outbox sender's and the watcher's)
    # and failed on the partly initialised pydicom.dataset (seen in CI), so pydicom is loaded here.
    # Not for a scan: its films are read by its decode processes (each sets the same settings) or, with
    # no decode processes, by its DecodePool, and its only thread (the results sender) loads the DICOM
    # stack before it starts. That keeps ~0.3 s of imports off every scan (#13).
    from worker.scoring.allocator import retain_freed_memory

    if sys.argv[1:2] != ["scan"]:
        from pipeline.dicom import configure_pydicom

        configure_pydicom()
    retain_freed_memory()
    try:
        app()
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        # A command that needs an extra the serving install lacks (TensorFlow): the one line to install it.
        hint = str(exc) if isinstance(exc, ExtraMissing) else missing_extra_message(exc)
        console.print(f"cxr-triage: error: {hint or logs.describe_error(exc)}", markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
