"""``cxr-triage web``, ``users add|list|remove|passwd`` and ``audit``: the web worklist's command line."""

from __future__ import annotations

import getpass
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from db.schema import UserRole
from worker.cli.options import setting

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=False)

users_app = typer.Typer(
    help="People who may sign in to the web worklist. Roles: viewer (sees), reviewer (also records "
    "reviews), admin (also manages users).",
    no_args_is_help=True,
)

DatabaseUrl = Annotated[str | None, setting("database_url")]
LogLevel = Annotated[str | None, setting("log_level")]


def _settings(database_url: str | None, log_level: str, *, read_only: bool = False, **flags):
    from worker.cli.startup import database_settings

    return database_settings(database_url=database_url, log_level=log_level, read_only=read_only, **flags)


def web_command(
    host: Annotated[str | None, setting("web_host", "--host")] = None,
    port: Annotated[int | None, setting("web_port", "--port", min=0, max=65535)] = None,
    viewer_url: Annotated[str | None, setting("viewer_url")] = None,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Serve the web worklist (sign in with a user made by `cxr-triage users add`).

    It binds to 127.0.0.1 unless told otherwise; put it behind an https reverse proxy before
    exposing it to a network (the session cookie is then marked Secure).
    """
    import uvicorn

    from db.engine import masked
    from worker.web.app import create_app

    settings = _settings(database_url, log_level, web_host=host, web_port=port, viewer_url=viewer_url)
    app = create_app(settings)
    where = f"{settings.web_host}:{settings.web_port}"
    try:  # bound here, before anything is announced: a busy port is one clear line and exit 2
        sock = _listening_socket(settings.web_host, settings.web_port)
    except OSError as exc:
        console.print(f"cannot listen on {where}: {exc.strerror or exc}", markup=False)
        raise typer.Exit(2) from None
    console.print(f"web worklist on http://{where}/ ; database {masked(settings.database_url)}", markup=False)
    config = uvicorn.Config(
        app,
        host=settings.web_host,
        port=settings.web_port,
        access_log=False,  # our own access log names films by short hash and never logs query strings
        log_config=None,
        proxy_headers=True,
        server_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


def _listening_socket(host: str, port: int):
    """A TCP socket bound to ``host:port`` (as uvicorn binds it: SO_REUSEADDR, IPv6 for a ':' host)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def _read_password(password_stdin: bool) -> str:
    if password_stdin or not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line.rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        console.print("[red]the two passwords differ[/red]")
        raise typer.Exit(2)
    return first


PasswordStdin = Annotated[
    bool,
    typer.Option(
        "--password-stdin",
        help="Read the password from standard input (also done whenever stdin is not a terminal).",
    ),
]


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="User name (letters, digits, . _ @ -).")],
    role: Annotated[UserRole, typer.Option("--role", help="viewer, reviewer or admin.")] = UserRole.VIEWER,
    password_stdin: PasswordStdin = False,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Add a user; the password is asked for (or read from standard input) and stored as an argon2 hash."""
    from db import audit
    from db.engine import session_scope
    from db.users import UserError, add_user

    settings = _settings(database_url, log_level)
    password = _read_password(password_stdin)
    try:
        with session_scope(settings.database_url) as session:
            add_user(session, name, password, role)
            detail = f"{name} as {role.value}"
            audit.record(session, audit.AuditAction.USER_ADD, operator_account(), detail=detail)
    except UserError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    console.print(f"user {name} added ({role.value})")


def operator_account() -> str:
    """Who ran a user command (the operating-system account), for the audit log."""
    try:
        return "os:" + getpass.getuser()
    except Exception:  # noqa: BLE001 - no account name available
        return "os:?"


@users_app.command("list")
def users_list(database_url: DatabaseUrl = None, log_level: LogLevel = None) -> None:
    """List users and their roles."""
    from db.engine import session_scope
    from db.users import list_users

    settings = _settings(database_url, log_level)
    with session_scope(settings.database_url) as session:
        users = [(u.username, u.role, u.created_at) for u in list_users(session)]
    table = Table()
    for column in ("user", "role", "created"):
        table.add_column(column)
    for username, role, created in users:
        table.add_row(username, role, created.strftime("%Y-%m-%d %H:%M"))
    out.print(table)


@users_app.command("remove")
def users_remove(
    name: Annotated[str, typer.Argument(help="User name.")],
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Remove a user; their open sessions stop working at once. Their reviews and audit entries stay."""
    from db import audit
    from db.engine import session_scope
    from db.users import UserError, remove_user

    settings = _settings(database_url, log_level)
    try:
        with session_scope(settings.database_url) as session:
            remove_user(session, name)
            audit.record(session, audit.AuditAction.USER_REMOVE, operator_account(), detail=name)
    except UserError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1) from exc
    console.print(f"user {name} removed")


@users_app.command("passwd")
def users_passwd(
    name: Annotated[str, typer.Argument(help="User name.")],
    password_stdin: PasswordStdin = False,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Give a user a new password; every web session of theirs ends at once."""
    from db import audit
    from db.engine import session_scope
    from db.users import UserError, set_password

    settings = _settings(database_url, log_level)
    password = _read_password(password_stdin)
    try:
        with session_scope(settings.database_url) as session:
            set_password(session, name, password)
            audit.record(session, audit.AuditAction.PASSWORD_CHANGE, operator_account(), detail=name)
    except UserError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    console.print(f"password of {name} changed; their sessions ended")


_RELATIVE = re.compile(r"^(\d+)\s*([mhd])$")


def parse_since(value: str) -> datetime:
    """``24h``, ``7d``, ``30m``, an ISO date or an ISO date-time (UTC unless it says otherwise)."""
    match = _RELATIVE.match(value.strip())
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        delta = {"m": timedelta(minutes=amount), "h": timedelta(hours=amount), "d": timedelta(days=amount)}[
            unit
        ]
        return datetime.now(UTC) - delta
    moment = datetime.fromisoformat(value.strip())
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def audit_command(
    since: Annotated[
        str, typer.Option(help="From when: 24h, 7d, 30m, 2026-11-23 or 2026-11-23T08:00 (UTC).")
    ] = "24h",
    limit: Annotated[int | None, typer.Option(min=1, help="At most N events.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Print the audit log: who viewed which film, who reviewed what and when, sign-ins, user changes."""
    from db.audit import events
    from db.engine import session_scope

    try:
        start = parse_since(since)
    except ValueError as exc:
        raise typer.BadParameter("use 24h, 7d, 30m or an ISO date / date-time", param_hint="--since") from exc
    settings = _settings(database_url, log_level, read_only=True)
    with session_scope(settings.database_url) as session:
        rows = events(session, since=start.astimezone(UTC), limit=limit)
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row) + "\n")
        return
    table = Table()
    for column in ("at (UTC)", "user", "action", "film", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["at"][:19].replace("T", " "),
            row["username"] or "",
            row["action"],
            (row["sha256"] or "")[:12],
            row["detail"] or "",
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    """Add the web commands to the main CLI."""
    app.command("web")(web_command)
    app.add_typer(users_app, name="users")
    app.command("audit")(audit_command)
