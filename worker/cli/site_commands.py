"""``cxr-triage sites add|list|remove`` and ``cxr-triage quality``: several sites, one installation.

A site is a name with its sources (drop-folder prefixes, DICOM calling AE titles); each film records
its site when it is registered (db/sites.py), follows its site's calibration
(``model calibrate --site``) and is counted in its site's part of the quality report (db/quality.py).
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.options import setting

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=False)

sites_app = typer.Typer(
    help="Sites of a hospital group: each a name with its drop folders and DICOM calling AE titles. "
    "Films from no configured source belong to the site 'default'.",
    no_args_is_help=True,
)

DatabaseUrl = Annotated[str | None, setting("database_url")]
LogLevel = Annotated[str | None, setting("log_level")]


class QualityFormat(StrEnum):
    table = "table"
    json = "json"


def _database(database_url: str | None, log_level: str | None) -> str:
    from worker.cli.startup import command_settings, prepare_database

    settings = command_settings(quiet=True, database_url=database_url, log_level=log_level)
    prepare_database(settings)
    return settings.database_url


@sites_app.command("add")
def sites_add(
    name: Annotated[str, typer.Argument(help="The site's name (letters, digits, '.', '_', '-').")],
    folder: Annotated[
        list[Path] | None, typer.Option("--folder", help="A drop folder of this site (every film under it).")
    ] = None,
    calling_ae: Annotated[
        list[str] | None,
        typer.Option(
            "--calling-ae", help="A DICOM calling AE title whose films (dicom-listen) are this site's."
        ),
    ] = None,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Add a site (or more sources to one). Films already registered under its folders or from its
    AE titles, and still at the site 'default', move to it; new films are assigned when registered."""
    from db.engine import session_scope
    from db.sites import SiteError, add_site

    if not folder and not calling_ae:
        raise typer.BadParameter("give at least one --folder or --calling-ae")
    url = _database(database_url, log_level)
    try:
        with session_scope(url) as session:
            moved = add_site(session, name, folders=folder or [], calling_aes=calling_ae or [])
    except SiteError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    console.print(f"site {name!r} stored; {moved} film(s) already registered moved to it")


@sites_app.command("list")
def sites_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """The sites with their sources and how many films each holds."""
    from dataclasses import asdict

    from db.engine import session_scope
    from db.sites import list_sites

    with session_scope(_database(database_url, log_level)) as session:
        sites = list_sites(session)
    if as_json:
        typer.echo(json.dumps([asdict(s) for s in sites], indent=2))
        return
    table = Table()
    for column in ("site", "folders", "calling AE titles", "films"):
        table.add_column(column, overflow="fold")
    for site in sites:
        table.add_row(
            site.name,
            "\n".join(site.folders) or ("(no configured source)" if site.name == "default" else ""),
            "\n".join(site.calling_aes),
            str(site.films),
        )
    out.print(table)


@sites_app.command("remove")
def sites_remove(
    name: Annotated[str, typer.Argument(help="The site to forget.")],
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Forget a site and its sources. Its films keep their site (history and quality stay theirs);
    new films from its former sources go to another matching site or to 'default'."""
    from db.engine import session_scope
    from db.sites import SiteError, remove_site

    try:
        with session_scope(_database(database_url, log_level)) as session:
            remove_site(session, name)
    except SiteError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    console.print(f"site {name!r} removed")


def quality_command(
    site: Annotated[str | None, typer.Option(help="Only this site.")] = None,
    since: Annotated[
        datetime | None, typer.Option(formats=["%Y-%m-%d"], help="From this day (default: 12 weeks back).")
    ] = None,
    format: Annotated[QualityFormat, typer.Option("--format", help="Output format.")] = QualityFormat.table,
    database_url: DatabaseUrl = None,
    log_level: LogLevel = None,
) -> None:
    """Per site and week: films scored, rejected and out of scope, the share flagged, the readers'
    agreement, PPV and missed pneumonia (95 % Wilson intervals), and whether the score distribution
    drifted from the one the site's calibration was fitted on (verdict and rule in the output).

    Exit status 0 whatever the verdict (alerting is Prometheus's job: deploy/prometheus/).
    """
    from db.engine import session_scope
    from db.quality import quality_report
    from worker.outcomes import classify

    with session_scope(_database(database_url, log_level)) as session:
        report = quality_report(
            session, site=site, since=since.date() if since else None, classify=lambda r: classify(r).value
        )
    if format is QualityFormat.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return
    _print_quality(report)


def _share(p: dict) -> str:
    if p["estimate"] is None:
        return "-"
    return f"{p['estimate']:.0%} ({p['low']:.0%}-{p['high']:.0%})"


def _print_quality(report: dict) -> None:
    for part in report["sites"]:
        calibration = part["calibration"]
        drift = part["drift"]
        out.print(
            f"[bold]site {part['site']}[/bold]: calibration "
            f"{calibration['name'] if calibration else '-'}; score distribution "
            f"[bold]{drift['verdict']}[/bold] over the last {drift['window_days']} days ({drift['why']})"
        )
        table = Table()
        for column in (
            "week", "films", "scored", "rejected", "out of scope", "flagged screen+", "flagged HIGH",
            "reviewed", "agreement", "PPV HIGH", "PPV screen+", "missed",
        ):  # fmt: skip
            table.add_column(column, overflow="fold")
        for week in [*part["weeks"], {"week": "all"} | part["totals"]]:
            reviews = week["reviews"]
            table.add_row(
                week["week"],
                str(week["films"]),
                str(week["scored"]),
                str(week["rejected"]),
                str(week["out_of_scope"]),
                _share(week["flagged_screen"]),
                _share(week["flagged_high"]),
                f"{reviews['count']} {_share(reviews['share_reviewed'])}",
                _share(reviews["agreement"]),
                _share(reviews["ppv_high"]),
                _share(reviews["ppv_screen"]),
                str(reviews["false_negatives"]),
            )
        out.print(table)
    console.print(f"[dim]drift rule: {report['drift_rule']}[/dim]")


def register(app: typer.Typer) -> None:
    app.add_typer(sites_app, name="sites")
    app.command("quality")(quality_command)
