"""``cxr-triage``: scan folders, watch drop folders, run workers, read the worklist."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from db.engine import default_database_url, masked
from worker import logs
from worker.progress import progress_bar
from worker.settings import Settings

log = logging.getLogger("cxr_triage")
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=False)

app = typer.Typer(
    help="Pneumonia triage for chest radiographs: score DICOM/PNG/JPEG files and keep a "
    "prioritised worklist.\n\n"
    "Research triage aid, not a diagnostic device.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema management (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")

DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        envvar="CXR_TRIAGE_DATABASE_URL",
        show_envvar=True,
        help="SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db. "
        f"Default: SQLite at {default_database_url().removeprefix('sqlite:///')}",
    ),
]
BrokerUrl = Annotated[
    str | None,
    typer.Option(
        "--broker-url",
        envvar="CXR_TRIAGE_BROKER_URL",
        show_envvar=True,
        help="Celery broker (redis://host:6379/0). Without it, work is done in this process.",
    ),
]
LogLevel = Annotated[
    str,
    typer.Option(
        "--log-level",
        envvar="CXR_TRIAGE_LOG_LEVEL",
        show_envvar=True,
        help="DEBUG shows every decision about every file (never patient identifiers).",
    ),
]
ModelDir = Annotated[
    Path | None,
    typer.Option(
        "--model-dir",
        envvar="CXR_TRIAGE_MODEL_DIR",
        show_envvar=True,
        help="Model folder (metadata.json + weights). Default: the shipped model.",
    ),
]
BatchSize = Annotated[
    int,
    typer.Option(
        "--batch-size", envvar="CXR_TRIAGE_BATCH_SIZE", min=1, max=512, help="Images per model call."
    ),
]
DecodeWorkers = Annotated[
    int | None,
    typer.Option(
        "--decode-workers",
        envvar="CXR_TRIAGE_DECODE_WORKERS",
        min=0,
        help="Processes decoding images in parallel (default: one per core; 0 decodes in this process).",
    ),
]


def _settings(
    database_url: str | None,
    log_level: str,
    broker_url: str | None = None,
    model_dir: Path | None = None,
    batch_size: int = 32,
    decode_workers: int | None = None,
) -> Settings:
    logs.configure(log_level)
    return Settings.build(
        database_url=database_url or None,
        broker_url=broker_url or None,
        model_dir=model_dir,
        batch_size=batch_size,
        decode_workers=decode_workers,
        log_level=log_level,
    )


def _prepare_database(settings: Settings) -> None:
    """Create or upgrade the schema (Alembic); cheap when it is already current."""
    from db.migrate import upgrade

    try:
        upgrade(settings.database_url)
    except Exception as exc:  # noqa: BLE001 - show a clear message instead of a traceback
        console.print(
            f"[red]cannot open the database {masked(settings.database_url)}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}[/red]"
        )
        raise typer.Exit(2) from exc


@db_app.command("upgrade")
def db_upgrade(database_url: DatabaseUrl = None, log_level: LogLevel = "INFO") -> None:
    """Create the schema or migrate it to the newest revision."""
    settings = _settings(database_url, log_level)
    _prepare_database(settings)
    console.print(f"database {masked(settings.database_url)} is at the newest schema")


@app.command()
def scan(
    paths: Annotated[
        list[Path], typer.Argument(help="Files or folders (searched recursively).", exists=True)
    ],
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    model_dir: ModelDir = None,
    batch_size: BatchSize = 32,
    decode_workers: DecodeWorkers = None,
    follow_symlinks: Annotated[
        bool, typer.Option(help="Follow symbolic links (off: links are ignored).")
    ] = False,
    wait: Annotated[bool, typer.Option(help="With a broker: wait until every queued file is final.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    log_level: LogLevel = "INFO",
) -> None:
    """Score every supported file under PATHS that is not scored yet (a backlog scan).

    Files already known with the same path, size and modification time are skipped without being read;
    the same content under two paths is scored once.
    """
    settings = _settings(database_url, log_level, broker_url, model_dir, batch_size, decode_workers)
    _prepare_database(settings)
    roots = [str(p) for p in paths]
    console.print(f"database: {masked(settings.database_url)}")
    started = time.perf_counter()
    if settings.broker_url:
        from worker.distributed import scan_distributed

        summary = scan_distributed(
            settings, roots, follow_symlinks=follow_symlinks, wait=wait, progress=progress, console=console
        )
    else:
        from worker.embedded import scan_embedded
        from worker.scanner import count_files

        total = count_files(roots, follow_symlinks)
        with progress_bar(console, progress) as bar:
            task = bar.add_task("scanning", total=total)
            summary = scan_embedded(
                settings, roots, follow_symlinks=follow_symlinks, on_progress=lambda n: bar.advance(task, n)
            )
    elapsed = time.perf_counter() - started
    _print_summary(summary, elapsed)


def _print_summary(summary, elapsed: float) -> None:
    outcomes = summary.outcomes
    rate = summary.processed / elapsed if elapsed > 0 else 0.0
    console.print(
        f"{summary.files} files: {outcomes.get('scored', 0)} scored, {outcomes.get('rejected', 0)} rejected, "
        f"{outcomes.get('failed', 0)} failed, {summary.skipped} skipped (already known), "
        f"{summary.duplicates} duplicate content; {outcomes.get('queued', 0)} queued; "
        f"{elapsed:.1f} s, {rate:.1f} images/s"
    )


class OutputFormat(StrEnum):
    table = "table"
    json = "json"
    csv = "csv"


@app.command()
def worklist(
    format: Annotated[OutputFormat, typer.Option("--format", help="Output format.")] = OutputFormat.table,
    limit: Annotated[int | None, typer.Option(help="Show at most N rows.", min=1)] = None,
    status: Annotated[
        str | None,
        typer.Option(help="Only rows in this state: scored, rejected, failed, queued, processing."),
    ] = None,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Print the worklist, most urgent first (unreviewed likely pneumonia on top; see README for aging).

    The rows are those of the database view: SELECT * FROM triage_worklist ORDER BY worklist_rank.
    """
    from db.engine import session_scope
    from db.worklist import INTENDED_USE, WorklistFilter, query_rows

    try:
        wanted = WorklistFilter(status=status)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--status") from exc
    settings = _settings(database_url, log_level)
    _prepare_database(settings)
    with session_scope(settings.database_url) as session:
        rows = query_rows(session, wanted, limit=limit)
    if format is OutputFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    elif format is OutputFormat.csv:
        columns = [c for c in rows[0] if c != "paths"] if rows else []
        writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _print_table(rows)
        console.print(f"[dim]{INTENDED_USE}[/dim]")


def _print_table(rows: list[dict]) -> None:
    table = Table(show_lines=False)
    for column in ("priority", "score", "call", "viral", "status", "scope", "path / reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        call = ""
        if row["status"] == "scored":
            call = "HIGH" if row["high_confidence"] else ("screen+" if row["screening_positive"] else "below")
        detail = row["path"] or "?"
        if row["reason"]:
            detail += f"\n{row['reason']}"
        table.add_row(
            "" if row["priority"] is None else f"{row['priority']:.1f}",
            "" if row["score"] is None else f"{row['score']:.3f}",
            call,
            "" if row["viral_probability"] is None else f"{row['viral_probability']:.2f}",
            row["status"],
            ("OUT OF SCOPE: " + (row["scope_note"] or "")) if row["out_of_scope"] else "",
            detail,
        )
    out.print(table)


@app.command()
def review(
    sha256: Annotated[str, typer.Argument(help="SHA-256 of the film (at least 8 leading characters).")],
    reviewer: Annotated[str | None, typer.Option(help="Who reviewed it.")] = None,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Mark a film as reviewed: it leaves the top of the worklist."""
    from db.engine import session_scope
    from db.queue import mark_reviewed

    settings = _settings(database_url, log_level)
    _prepare_database(settings)
    with session_scope(settings.database_url) as session:
        changed = mark_reviewed(session, sha256, reviewer)
    console.print(f"{changed} film(s) marked reviewed")
    if changed == 0:
        raise typer.Exit(1)


@app.command()
def watch(
    paths: Annotated[list[Path], typer.Argument(help="Drop folders to watch (created if missing).")],
    polling: Annotated[bool, typer.Option(help="Poll instead of inotify (SMB/NFS shares).")] = False,
    stable_seconds: Annotated[
        float,
        typer.Option(
            envvar="CXR_TRIAGE_STABLE_SECONDS",
            help="Without a close event, take a file once its size and mtime have not changed for this long.",
        ),
    ] = 2.0,
    batch_wait: Annotated[
        float,
        typer.Option(
            envvar="CXR_TRIAGE_BATCH_WAIT",
            help="Longest wait (s) for more files before a partial batch goes.",
        ),
    ] = 0.5,
    rescan_interval: Annotated[
        float,
        typer.Option(
            envvar="CXR_TRIAGE_RESCAN_INTERVAL", help="Seconds between reconciliation rescans of the folders."
        ),
    ] = 300.0,
    follow_symlinks: Annotated[bool, typer.Option(help="Follow symbolic links (off by default).")] = False,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    model_dir: ModelDir = None,
    batch_size: BatchSize = 32,
    decode_workers: DecodeWorkers = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Watch drop folders; score new files in this process, or queue them when a broker is set."""
    from worker.watcher import Watcher, WatchOptions

    settings = _settings(database_url, log_level, broker_url, model_dir, batch_size, decode_workers)
    _prepare_database(settings)
    options = WatchOptions(
        polling=polling,
        stable_seconds=stable_seconds,
        batch_wait_seconds=batch_wait,
        rescan_interval=rescan_interval,
        follow_symlinks=follow_symlinks,
    )
    roots = [str(p.resolve()) for p in paths]
    mode = f"queueing to {masked(settings.broker_url)}" if settings.broker_url else "scoring in this process"
    console.print(f"watching {len(roots)} folder(s), {mode}; database {masked(settings.database_url)}")
    watcher = Watcher(settings, roots, options)
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop_event.set())
    started = time.perf_counter()
    with contextlib.suppress(KeyboardInterrupt):
        watcher.run()
    _print_summary(watcher.summary, time.perf_counter() - started)


@app.command("worker")
def worker_command(
    processes: Annotated[
        int, typer.Option(min=1, help="CPU worker processes (ignored when GPUs are used).")
    ] = 1,
    gpus: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated GPU ids, one worker process each (default: CUDA_VISIBLE_DEVICES, else all)."
        ),
    ] = None,
    cpu_only: Annotated[bool, typer.Option("--cpu", help="Do not use GPUs even if present.")] = False,
    lease_seconds: Annotated[
        float,
        typer.Option(
            envvar="CXR_TRIAGE_LEASE_SECONDS", help="A claimed file unfinished after this long is requeued."
        ),
    ] = 900.0,
    database_url: DatabaseUrl = None,
    broker_url: BrokerUrl = None,
    model_dir: ModelDir = None,
    batch_size: BatchSize = 32,
    decode_workers: DecodeWorkers = None,
    log_level: LogLevel = "INFO",
) -> None:
    """Run Celery workers that score queued files (needs --broker-url / CXR_TRIAGE_BROKER_URL)."""
    from worker.supervisor import Supervisor, WorkerSpec, visible_gpus

    settings = _settings(database_url, log_level, broker_url, model_dir, batch_size, decode_workers)
    if not settings.broker_url:
        console.print("[red]a broker is required: set --broker-url or CXR_TRIAGE_BROKER_URL[/red]")
        raise typer.Exit(2)
    settings = settings.with_changes(lease_seconds=lease_seconds)
    _prepare_database(settings)
    gpu_ids = [] if cpu_only else visible_gpus(gpus)
    specs = [WorkerSpec(f"gpu{g}", g) for g in gpu_ids] or [
        WorkerSpec(f"cpu{i}", None) for i in range(processes)
    ]
    per_worker = max(settings.decode_processes // len(specs), 1) if decode_workers is None else decode_workers
    console.print(
        f"{len(specs)} worker process(es) on {masked(settings.broker_url)}, "
        f"{per_worker} decode process(es) each; database {masked(settings.database_url)}"
    )
    recover_every = max(min(settings.lease_seconds / 4, 60.0), 2.0)
    raise typer.Exit(Supervisor(settings, specs, per_worker, log_level.upper(), recover_every).run())


def _register_optional_commands() -> None:
    try:
        from worker.model_commands import explain_command, model_app
    except ImportError:  # model tooling not present in this build
        return
    app.add_typer(model_app, name="model")
    app.command("explain")(explain_command)


_register_optional_commands()
from worker.web_commands import register as _register_web_commands  # noqa: E402 - web, users, audit

_register_web_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
