"""``cxr-triage model calibrate | calibrations | fit-ood``: site calibration and the OOD guard.

A site re-fits its operating points from a small local labelled sample (or from its readers'
reviews); the calibration is stored in the database and becomes the active one for the model
version, which the worklist and every command read at the time they need it (no restart).
The rule and its cost are in ``models/calibration.py`` and the model card.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from worker.cli.options import ModelDir, data_dir_of, setting

if TYPE_CHECKING:  # numpy is imported by the commands that compute: every CLI start loads this module
    import numpy as np

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=False)

DatabaseUrlOption = Annotated[str | None, setting("database_url")]
ModelDirOption = ModelDir
LABELS = {"pneumonia": 1, "1": 1, "positive": 1, "normal": 0, "0": 0, "negative": 0}
FILE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg", "")


def _database(database_url: str | None, *, read_only: bool = False) -> str:
    """Settings' database URL, migrated to the newest schema (clear message, no traceback); a
    ``read_only`` command refuses a database that does not exist."""
    from worker.cli.startup import database_settings

    return database_settings(quiet=True, read_only=read_only, database_url=database_url).database_url


def _model_dir(model_dir: Path | None) -> Path:
    """The flag, else ``CXR_TRIAGE_MODEL_DIR`` (through Settings), else the shipped model."""
    from worker.settings import Settings

    return Settings.build(model_dir=model_dir).resolved_model_dir()


def shipped_thresholds(model_dir: Path | None):
    """The model's own operating points, read from metadata.json (no TensorFlow needed)."""
    from db.calibration import ShippedThresholds

    return ShippedThresholds.from_metadata(json.loads((_model_dir(model_dir) / "metadata.json").read_text()))


def add_active_calibration(report, database_url: str | None, model_dir: Path | None) -> None:
    """Add the operating points (with CIs) of the active calibration to an evaluation report."""
    from db.calibration import SHIPPED, active_calibration, ensure_shipped
    from db.engine import session_scope

    url = _database(database_url)
    with session_scope(url) as session:
        ensure_shipped(session, shipped_thresholds(model_dir))
        row = active_calibration(session, report.model_version)
        active = None if row is None else (row.name, row.screening_threshold, row.high_confidence_threshold)
    if active is None or active[0] == SHIPPED:
        console.print("active calibration: shipped (the model's own thresholds, above)")
        return
    report.add_calibration(f"active calibration {active[0]!r}", active[1], active[2])


# -- gathering labelled films ----------------------------------------------------------------------
def labelled_folder(folder: Path) -> list[tuple[Path, int]]:
    """Files under ``folder/NORMAL`` and ``folder/PNEUMONIA`` (searched recursively)."""
    found = []
    for name, label in (("NORMAL", 0), ("PNEUMONIA", 1)):
        sub = folder / name
        if sub.is_dir():
            found += [
                (p, label) for p in sorted(sub.rglob("*")) if p.is_file() and not p.name.startswith(".")
            ]
    if not found:
        raise typer.BadParameter(f"{folder} holds no NORMAL/ or PNEUMONIA/ files", param_hint="DIR")
    return found


def labelled_csv(path: Path) -> list[tuple[Path, int]]:
    """``path,label`` rows (label pneumonia/normal or 1/0); relative paths are taken from the CSV's folder."""
    rows = []
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or row[0].strip().lower() in ("path", "") or row[0].startswith("#"):
                continue
            if len(row) < 2 or row[1].strip().lower() not in LABELS:
                raise typer.BadParameter(
                    f"line {number}: expected 'path,label' with label pneumonia or normal",
                    param_hint="--labels",
                )
            file = Path(row[0].strip())
            rows.append((file if file.is_absolute() else path.parent / file, LABELS[row[1].strip().lower()]))
    if not rows:
        raise typer.BadParameter("no labelled rows", param_hint="--labels")
    return rows


@dataclass
class ScoredSample:
    """Labels and scores of the films that went through, and what did not."""

    labels: np.ndarray
    probabilities: np.ndarray
    logits: np.ndarray
    unreadable: int
    out_of_distribution: int


def score_labelled(scorer, films: list[tuple[Path, int]], batch_size: int = 32) -> ScoredSample:
    """Score films through the same path as ``scan`` (decode -> the model's input -> Scorer).

    Films that cannot be decoded, or that the OOD guard rejects, would never reach the
    worklist, so they are left out of the fit and counted.
    """
    import numpy as np

    from worker.scoring.prepare import prepare

    labels, probs, logits = [], [], []
    unreadable = ood = 0
    for start in range(0, len(films), batch_size):
        chunk = [
            (label, prepare(str(path), scorer.input_plan))
            for path, label in films[start : start + batch_size]
        ]
        ready = [(label, p.tensor) for label, p in chunk if p.tensor is not None]
        unreadable += len(chunk) - len(ready)
        if not ready:
            continue
        for (label, _), score in zip(ready, scorer.score_batch(np.stack([t for _, t in ready])), strict=True):
            if score.out_of_distribution:
                ood += 1
                continue
            labels.append(label)
            probs.append(score.pneumonia_probability)
            logits.append(score.pneumonia_logit)
    return ScoredSample(np.array(labels), np.array(probs), np.array(logits), unreadable, ood)


# -- commands --------------------------------------------------------------------------------------
def calibrate_command(
    folder: Annotated[
        Path | None,
        typer.Argument(
            help="Folder with NORMAL/ and PNEUMONIA/ sub-folders of local films.", exists=True, metavar="DIR"
        ),
    ] = None,
    labels: Annotated[
        Path | None,
        typer.Option("--labels", help="CSV of 'path,label' rows instead of a folder.", exists=True),
    ] = None,
    from_reviews: Annotated[
        bool, typer.Option("--from-reviews", help="Use the readers' reviews stored by the web worklist.")
    ] = False,
    target_sensitivity: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Sensitivity wanted at the screening threshold.")
    ] = 0.98,
    target_specificity: Annotated[
        float, typer.Option(min=0.5, max=0.999, help="Specificity wanted at the high-confidence threshold.")
    ] = 0.95,
    name: Annotated[
        str | None, typer.Option(help="Name of the calibration (default: site-<UTC time>).")
    ] = None,
    force: Annotated[
        bool, typer.Option(help="Store it even when the sample is too small (< 50 pneumonia or < 30 normal).")
    ] = False,
    activate: Annotated[bool, typer.Option(help="Make it the active calibration at once.")] = True,
    site: Annotated[
        str | None,
        typer.Option(
            help="Calibrate for this site's films only (`cxr-triage sites list`); default: every site."
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Fit and report; store nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the fit as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
    model_dir: ModelDirOption = None,
) -> None:
    """Fit this site's screening and high-confidence thresholds from local labelled films.

    Films are scored exactly as `scan` scores them. The screening threshold errs toward
    sensitivity, the high-confidence threshold toward specificity (rule: MODEL_CARD.md,
    "Site calibration"); both come with bootstrap 95 % confidence intervals. The calibration is
    stored and becomes the active one for this model version: the worklist, its tiers and its
    priorities follow it without a restart. `cxr-triage model calibrations --activate shipped`
    goes back. With --site it applies to that site's films only (with --from-reviews: fitted on
    that site's reviewed films); the other sites keep theirs. The sample's scores are stored with
    it: `cxr-triage quality` compares each site's recent scores with them.
    """
    import numpy as np

    from db.calibration import CalibrationError, review_labels, store
    from db.engine import session_scope
    from models.calibration import ThresholdRule, calibrate

    if sum(bool(x) for x in (folder, labels, from_reviews)) != 1:
        raise typer.BadParameter("give exactly one of DIR, --labels CSV or --from-reviews")
    url = _database(database_url)
    directory = _model_dir(model_dir)
    shipped = shipped_thresholds(directory)
    if site is not None:
        _check_site(url, site)
    if from_reviews:
        with session_scope(url) as session:
            found = review_labels(session, shipped.model_version, site)
        y = np.array([r.label for r in found])
        prob = np.array([r.probability for r in found])
        logit = np.array([r.logit for r in found])
        source = "reviews"
        console.print(
            f"reader reviews: {len(y)} films with a label under this model version "
            f"({int(y.sum())} pneumonia, {len(y) - int(y.sum())} normal)"
        )
    else:
        from pipeline.inference import Scorer

        films = labelled_csv(labels) if labels else labelled_folder(folder)
        scorer = Scorer.load(directory)
        sample = score_labelled(scorer, films)
        y, prob, logit, source = sample.labels, sample.probabilities, sample.logits, "labels"
        console.print(
            f"{len(films)} labelled files: {len(y)} scored ({int(y.sum())} pneumonia, "
            f"{len(y) - int(y.sum())} normal), {sample.unreadable} unreadable or out of scope, "
            f"{sample.out_of_distribution} turned away by the input checks (left out)"
        )
    try:
        rule = ThresholdRule(target_sensitivity, target_specificity)
        fit = calibrate(y, prob, logit, shipped.temperature, rule)
    except ValueError as exc:
        console.print(f"[red]cannot calibrate: {exc}[/red]")
        raise typer.Exit(2) from exc
    name = name or f"{site or 'site'}-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    _print_fit(fit, as_json, name)
    if fit.too_small and not force:
        console.print(
            "[bold red]SAMPLE TOO SMALL: nothing stored. Label more films (>= 50 pneumonia and "
            ">= 30 normal), or store it anyway with --force.[/bold red]"
        )
        raise typer.Exit(3)
    if dry_run:
        console.print("dry run: nothing stored")
        return
    # the fitting sample's logits: the reference the quality report compares recent scores with
    sample_logits = [round(float(x), 4) for x in np.asarray(logit, dtype=float)]
    details = fit.details() | {"forced": bool(fit.too_small and force), "sample_logits": sample_logits}
    try:
        with session_scope(url) as session:
            from db.calibration import ensure_shipped

            ensure_shipped(session, shipped)
            store(
                session,
                name=name,
                model_version=shipped.model_version,
                screening_threshold=fit.screening_threshold,
                high_confidence_threshold=fit.high_confidence_threshold,
                temperature=shipped.temperature,
                source=source,
                sample_size=fit.sample_size,
                positives=fit.positives,
                target_sensitivity=target_sensitivity,
                target_specificity=target_specificity,
                details=details,
                activate=activate,
                site=site,
            )
    except CalibrationError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    state = "stored and active" if activate else "stored (not active)"
    where = f"site {site!r}" if site else "every site without its own"
    console.print(f"calibration {name!r} {state} for model {shipped.model_version} ({where})")


def _check_site(url: str, site: str) -> None:
    from db.engine import session_scope
    from db.sites import site_names

    with session_scope(url) as session:
        known = site_names(session)
    if site not in known:
        console.print(
            f"[red]no site named {site!r} (known: {', '.join(known)}); see `cxr-triage sites add`[/red]"
        )
        raise typer.Exit(2)


def _print_fit(fit, as_json: bool, name: str) -> None:
    if as_json:
        payload = {
            "name": name,
            "screening_threshold": fit.screening_threshold,
            "high_confidence_threshold": fit.high_confidence_threshold,
            "sample_size": fit.sample_size,
            "positives": fit.positives,
            "target_sensitivity": fit.target_sensitivity,
            "target_specificity": fit.target_specificity,
            "too_small": fit.too_small,
            **fit.details(),
        }
        typer.echo(json.dumps(payload, indent=2))
    else:
        typer.echo(fit.text())
    for warning in fit.warnings:
        console.print(f"[yellow]WARNING: {warning}[/yellow]")


def calibrations_command(
    activate: Annotated[
        str | None, typer.Option("--activate", help="Make this calibration (or 'shipped') the active one.")
    ] = None,
    site: Annotated[
        str | None,
        typer.Option(
            help="Those in force at this site (its own and those for every site); --activate then "
            "applies to this site ('shipped': the site follows the calibration for every site)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
    database_url: DatabaseUrlOption = None,
    model_dir: ModelDirOption = None,
) -> None:
    """List the stored calibrations of the current model (site, sample size, targets, CIs, date, active)."""
    from db.calibration import CalibrationError, activate_calibration, ensure_shipped, list_calibrations
    from db.engine import session_scope

    url = _database(database_url, read_only=True)
    shipped = shipped_thresholds(model_dir)
    try:
        with session_scope(url) as session:
            ensure_shipped(session, shipped)
            if activate:
                activate_calibration(session, shipped.model_version, activate, site)
                where = f" at site {site!r}" if site else ""
                console.print(
                    f"calibration {activate!r} is now active for model {shipped.model_version}{where}"
                )
            rows = [_row_dict(r) for r in list_calibrations(session, shipped.model_version, site)]
    except CalibrationError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"calibrations of {shipped.model_version}")
    for column in (
        "active",
        "site",
        "name",
        "source",
        "films (pneumonia)",
        "targets",
        "screening",
        "high confidence",
        "date",
    ):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            "*" if row["active"] else "",
            row["site"] or "(all)",
            row["name"],
            row["source"],
            f"{row['sample_size']} ({row['positives']})" if row["sample_size"] else "-",
            "-"
            if row["target_sensitivity"] is None
            else f"sens {row['target_sensitivity']}/spec {row['target_specificity']}",
            _threshold_cell(row["screening_threshold"], row["details"].get("screening")),
            _threshold_cell(row["high_confidence_threshold"], row["details"].get("high_confidence")),
            row["created_at"][:19],
        )
    out.print(table)


def _threshold_cell(threshold: float, estimate: dict | None) -> str:
    if not estimate:
        return f"{threshold:.4f}"
    sens, spec = estimate["sensitivity"], estimate["specificity"]
    return (
        f"{threshold:.4f}\nsens {sens['value']:.3f} [{sens['low']:.3f}-{sens['high']:.3f}]"
        f"\nspec {spec['value']:.3f} [{spec['low']:.3f}-{spec['high']:.3f}]"
    )


def _row_dict(row) -> dict:
    from db.calibration import details_of

    details = details_of(row)
    sample = details.pop("sample_logits", None)  # long: the count is enough here
    return {
        "name": row.name,
        "site": row.site,
        "model_version": row.model_version,
        "active": bool(row.active),
        "source": row.source,
        "screening_threshold": row.screening_threshold,
        "high_confidence_threshold": row.high_confidence_threshold,
        "temperature": row.temperature,
        "sample_size": row.sample_size,
        "positives": row.positives,
        "target_sensitivity": row.target_sensitivity,
        "target_specificity": row.target_specificity,
        "created_at": row.created_at.isoformat() if row.created_at else "",
        "details": details,
        "sample_scores_stored": len(sample or []),
    }


def fit_ood_command(
    data_dir: Annotated[
        Path | None,
        typer.Argument(help="Training data (kermany-cxr224/train layout). Default: CXR_TRIAGE_DATA_DIR."),
    ] = None,
    dicom_dir: Annotated[
        Path | None, typer.Option(help="Shared DICOM folder for the battery (INVENTORY.tsv).")
    ] = None,
    model_dir: ModelDirOption = None,
    battery_films: Annotated[int, typer.Option(min=0, help="Validation films in the battery.")] = 150,
    other_chest: Annotated[
        Path | None,
        typer.Option(
            help="A folder of upright frontal chest films of other populations (e.g. the adult films of"
            " lung-masks/images): the guard then accepts chest films unlike the training hospital's"
            " instead of turning them away. Cut-offs stay on the validation films.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
) -> None:
    """Fit the out-of-distribution guard (ood.npz beside the model) and report the battery's rates.

    Density on the training films' penultimate features, cut-off on the validation films
    (1.25 x the distance keeping 99.5 %); orientation check (rotated, upside-down, inverted
    films) on training films vs their own turned copies, cut-off keeping 99.5 % of the
    validation films. No training: the model itself is unchanged.
    """
    import numpy as np

    from models import data
    from models.ood_fit import battery, fit_and_write, image_files, run_battery
    from pipeline.inference import LITE_MODEL_FILE, Scorer

    directory = _model_dir(model_dir)
    root = data_dir_of(data_dir)
    guard = fit_and_write(root, directory, other_chest=image_files(other_chest) if other_chest else [])
    console.print(f"wrote {directory / 'ood.npz'}: {json.dumps(guard.info)}")
    if (directory / LITE_MODEL_FILE).is_file():  # the export holds the guard: make it anew
        from models.lite import export_lite

        export_lite(directory)
        console.print(f"wrote {directory / LITE_MODEL_FILE} (the serving graph with the new guard)")
    scorer = Scorer.load(directory)
    _, val = data.partition(data.list_samples(root), data.read_split())
    rng = np.random.default_rng(1)
    films = [val[i].path for i in rng.choice(len(val), min(battery_films, len(val)), replace=False)]
    typer.echo(json.dumps(run_battery(scorer, battery(dicom_dir, films)).rates(), indent=2))
