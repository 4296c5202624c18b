"""CLI: ``cxr-triage dicom-listen`` and ``cxr-triage outbox list|retry``.

Registered in :mod:`worker.cli.app`; the ``--send-results`` option of watch/scan/worker is
:data:`SendResults` and starts the sender with :func:`worker.dicomnet.sender.start_results_sender`.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from db.schema import OutboxStatus
from worker import metrics
from worker.cli.options import setting
from worker.cli.startup import command_settings, database_settings
from worker.settings import Settings

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=False)

outbox_app = typer.Typer(
    help="DICOM results waiting to be sent, sent or failed (see --send-results).", no_args_is_help=True
)

SendResults = Annotated[str | None, setting("results_destination", "--send-results")]
SendHeatmap = Annotated[bool | None, setting("send_heatmap")]
SendKeyObject = Annotated[bool | None, setting("send_key_object")]
DatabaseUrl = Annotated[str | None, setting("database_url")]
LogLevel = Annotated[str | None, setting("log_level")]


def check_results(settings: Settings) -> None:
    """A malformed ``--send-results`` destination fails early and clearly (exit 2)."""
    from worker.dicomnet.plan import DestinationError, results_plan

    try:
        results_plan(settings)
    except DestinationError as exc:
        console.print(f"[red]--send-results: {exc}[/red]")
        raise typer.Exit(2) from exc


def dicom_listen_command(
    drop_dir: Annotated[
        Path, typer.Argument(help="Drop folder that `watch` (or a `watch` on the same share) watches.")
    ],
    port: Annotated[int | None, setting("dicom_port", "--port", min=0, max=65535)] = None,
    ae_title: Annotated[str | None, setting("dicom_ae_title", "--ae-title")] = None,
    allowed_callers: Annotated[str | None, setting("allowed_callers")] = None,
    bind: Annotated[str | None, setting("dicom_bind_address", "--bind")] = None,
    metrics_port: Annotated[int | None, setting("metrics_port", min=0, max=65535)] = None,
    log_level: LogLevel = None,
) -> None:
    """Receive films over DICOM (C-STORE, C-ECHO) and drop them into DROP_DIR for `watch`.

    Each instance is written to a hidden .part file, flushed, and renamed into DROP_DIR under a name
    made from a hash of its SOP Instance UID (no patient identifiers); the same instance sent again
    (even in another transfer syntax) is a duplicate: the first copy is kept. Compressed syntaxes (JPEG,
    JPEG-LS, JPEG 2000, RLE, deflate) are accepted. A full disk or an unwritable folder answers the
    sender with a failure status (0xA700 / 0x0110), so the sender keeps the film and retries.

    Example: cxr-triage dicom-listen /srv/cxr/drop --port 11112 --ae-title CXR_TRIAGE
    --allowed-callers PACS,CR_ROOM1   (then: cxr-triage watch /srv/cxr/drop --send-results PACS@pacs:104)
    """
    from worker.dicomnet.listener import StorageListener

    settings = command_settings(
        dicom_port=port,
        dicom_ae_title=ae_title,
        allowed_callers=allowed_callers,
        dicom_bind_address=bind,
        metrics_port=metrics_port,
        log_level=log_level,
    )
    metrics.start(settings, model_check=lambda: True, disk_paths={"drop_folder": [str(drop_dir)]})
    listener = StorageListener(
        drop_dir,
        port=settings.dicom_port,
        ae_title=settings.dicom_ae_title,
        allowed_callers=settings.allowed_callers,
        host=settings.dicom_bind_address,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        bound = listener.start()
    except OSError as exc:
        where = f"{settings.dicom_bind_address}:{settings.dicom_port}"
        console.print(f"[red]cannot listen on {where}: {exc.strerror or exc}[/red]")
        raise typer.Exit(2) from exc
    callers = ",".join(settings.allowed_callers) or "any calling AE title"
    console.print(
        f"listening as {settings.dicom_ae_title} on {settings.dicom_bind_address}:{bound} ({callers}); "
        f"dropping into {drop_dir}"
    )
    try:
        stop.wait()
    finally:
        listener.stop()
        console.print(f"received {listener.stats.received} instance(s), {listener.stats.failed} failed")


class ListFormat(StrEnum):
    table = "table"
    json = "json"


@outbox_app.command("list")
def outbox_list(
    status: Annotated[
        OutboxStatus | None, typer.Option(help="Only rows in this state (pending, sent, failed).")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="Show at most N rows (newest first).")] = 100,
    format: Annotated[ListFormat, typer.Option("--format")] = ListFormat.table,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """List outbox rows: film (by content hash), kind (sr, sc, ko), destination, state, last error."""
    from db import outbox
    from db.engine import session_scope

    settings = _prepared(database_url, log_level, read_only=True)
    with session_scope(settings.database_url) as session:
        rows = [row.as_dict() for row in outbox.list_items(session, status, limit)]
        counts = outbox.counts(session)
    if format is ListFormat.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table()
    columns = ("id", "film", "kind", "destination", "status", "attempts", "next try / sent", "last error")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        when = row["sent_at"] if row["status"] == "sent" else row["next_attempt_at"]
        table.add_row(
            str(row["id"]),
            row["image_sha256"][:12],
            row["kind"],
            row["destination"],
            row["status"],
            str(row["attempts"]),
            (when or "")[:19],
            row["last_error"] or "",
        )
    out.print(table)
    summary = ", ".join(f"{count} {state}" for state, count in sorted(counts.items()))
    console.print(summary or "outbox is empty")


@outbox_app.command("retry")
def outbox_retry(
    ids: Annotated[
        list[int] | None,
        typer.Argument(help="Outbox row ids (default: every failed row; with --sent, sent ones too)."),
    ] = None,
    all_sent: Annotated[
        bool, typer.Option("--sent", help="Also resend rows already sent (e.g. the PACS lost them).")
    ] = False,
    destination: Annotated[str | None, typer.Option(help="Only rows for this AET@host:port.")] = None,
    new_instance: Annotated[
        bool, typer.Option(help="Send a new object (new SOP Instance UID) instead of the same one again.")
    ] = False,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = "WARNING",
) -> None:
    """Ask again: failed rows go back to pending, sent by the next running watch, scan or worker.

    A row already sent is sent again only with --sent; a pending row is left alone (it is on its way,
    and a running sender may be sending it right now).
    """
    from db import outbox
    from db.engine import session_scope

    settings = _prepared(database_url, log_level)
    with session_scope(settings.database_url) as session:
        done = outbox.retry(
            session, ids=ids or (), include_sent=all_sent, destination=destination, new_instance=new_instance
        )
    for row_id in done.already_sent:
        console.print(f"row {row_id} was already sent; add --sent to send it again")
    for row_id in done.pending:
        console.print(f"row {row_id} is still pending (it will be sent); left as it is")
    for row_id in done.missing:
        console.print(f"no outbox row {row_id}")
    console.print(f"{done.queued} row(s) queued again")
    if done.queued == 0 or done.already_sent or done.missing:
        raise typer.Exit(1)


def _prepared(database_url: str | None, log_level: str | None, *, read_only: bool = False) -> Settings:
    return database_settings(database_url=database_url, log_level=log_level, read_only=read_only)


def register(app: typer.Typer) -> None:
    """Add ``dicom-listen`` and ``outbox`` to the main CLI."""
    app.command("dicom-listen")(dicom_listen_command)
    app.add_typer(outbox_app, name="outbox")
