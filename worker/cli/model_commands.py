"""``cxr-triage model ...`` and ``cxr-triage explain``: the model's one command line.

Training-side tools (train, ensemble, compare, stress-test) and evaluation take the data folder as
an argument or from ``CXR_TRIAGE_DATA_DIR`` (``Settings.data_dir``); nothing assumes a checkout.
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import numpy as np
import typer
from rich.console import Console

from models import default_model_dir
from worker.cli.options import ModelDir, data_dir_of
from worker.settings import default_of

console = Console(stderr=True)

model_app = typer.Typer(
    help="Train, evaluate and inspect the pneumonia model (research triage aid, not a diagnostic device).",
    no_args_is_help=True,
)


DataDirArgument = Annotated[
    Path | None,
    typer.Argument(
        help="Folder with NORMAL/ and PNEUMONIA/ sub-folders. Default: $CXR_TRIAGE_DATA_DIR.",
        show_default=False,
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder with NORMAL/ and PNEUMONIA/ (validation split). Default: $CXR_TRIAGE_DATA_DIR.",
        show_default=False,
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Cache of resized training arrays. Default: $XDG_CACHE_HOME/cxr-triage (~/.cache/cxr-triage).",
        show_default=False,
    ),
]


def _cache_dir(given: Path | None) -> Path:
    """Where training arrays are cached: outside the package, in the user's cache folder."""
    return given or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr-triage"


class Split(StrEnum):
    """Which files of a training-layout folder to evaluate."""

    all = "all"
    val = "val"


@model_app.command("train")
def train_command(
    data_dir: DataDirArgument = None,
    arch: Annotated[str, typer.Option(help="baseline, resnet or mobilenet.")] = "resnet",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (fixed cosine schedule).")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed (weights, shuffling, augmentation).")] = 1337,
    size: Annotated[int, typer.Option(min=32, max=512, help="Square input size in pixels.")] = 128,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate (AdamW, warm-up + cosine).")] = 2e-3,
    augment: Annotated[
        str,
        typer.Option(
            help="Augmentation preset: 'standard', 'strong' (wider zoom, black borders) or 'shift' (strong"
            " plus random side markers/text, collimation bands, resolution loss, contrast curves) or"
            " 'markers' / 'bands' (strong plus only the side markers/text, or only the collimation bands)."
        ),
    ] = "standard",
    out: Annotated[
        Path, typer.Option(help="Output folder for model.keras, metadata.json and history.json.")
    ] = Path("models/shipped"),
    cache_dir: CacheDirOption = None,
    lung_model: Annotated[
        Path | None,
        typer.Option(
            help="A lung model (lungs.tflite from `python -m models.lung_seg`): the classifier then reads"
            " each film cut to its lung box, and OUT ships that lung model beside it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    suppress_outside: Annotated[
        bool,
        typer.Option(
            "--suppress-outside",
            help="With --lung-model: also set what lies outside the (slightly widened) lung fields to"
            " the lungs' median grey, so that nothing but the lungs is left to read.",
        ),
    ] = False,
) -> None:
    """Train on the patient-wise split (models/splits/val_patients.txt), calibrate, write OUT.

    Validation patients are never trained on; temperature and thresholds are fitted on them.
    Expect about 15-30 s per epoch at 128 px on a 2-core CPU.
    """
    from models.augment import PRESETS
    from models.train import TrainConfig, train

    if augment not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(sorted(PRESETS))}", param_hint="--augment")
    folders = {"data_dir": str(data_dir_of(data_dir)), "cache_dir": str(_cache_dir(cache_dir))}
    recipe = {"arch": arch, "epochs": epochs, "seed": seed, "size": size, "lr": lr}
    if suppress_outside and lung_model is None:
        raise typer.BadParameter("needs --lung-model (the lung fields say what is outside)",
                                 param_hint="--suppress-outside")
    lungs = str(lung_model) if lung_model else None
    cfg = TrainConfig(**recipe, **folders, augment=PRESETS[augment], lung_model=lungs,
                      suppress_outside=suppress_outside)
    metadata = train(cfg, out, log=_log)
    typer.echo(json.dumps(metadata, indent=2))


def _log(line: str) -> None:
    console.print(line, highlight=False)


@model_app.command("ensemble")
def ensemble_command(
    model_dirs: Annotated[
        list[Path], typer.Argument(help="Trained model folders (the members).", exists=True)
    ],
    out: Annotated[Path, typer.Option(help="Output folder for the averaged model.")],
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Average the logits of MODEL_DIRS into one model; refit temperature and thresholds on validation."""
    from models.ensemble import build_and_export

    metadata = build_and_export(model_dirs, out, data_dir_of(data_dir), _cache_dir(cache_dir))
    typer.echo(json.dumps(metadata, indent=2))


@model_app.command("unpack")
def unpack_command(
    out: Annotated[Path, typer.Option(help="Folder to write one run folder per member into.")],
    model_dir: ModelDir = None,
    data_dir: DataDirOption = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Write each member of an ensemble (the shipped model by default) back as a training run folder.

    Then ``model ensemble`` can rebuild the ensemble with one member replaced, and ``model compare``
    can compare a new member with the one it would replace, without retraining the others.
    """
    from models.ensemble import unpack

    folder = model_dir or default_model_dir()
    for member in unpack(Path(folder), out, data_dir_of(data_dir), _cache_dir(cache_dir)):
        typer.echo(str(member))


@model_app.command("compare")
def compare_command(
    model_dirs: Annotated[list[Path], typer.Argument(help="Trained model folders.", exists=True)],
    data_dir: DataDirOption = None,
    tta: Annotated[bool, typer.Option("--tta", help="Also a zoom-TTA row for the first folder.")] = False,
    stress: Annotated[bool, typer.Option(help="Run the stress test of every folder.")] = True,
    bench: Annotated[bool, typer.Option(help="Measure CPU throughput at batch 32.")] = True,
    json_out: Annotated[Path | None, typer.Option("--json-out", help="Also write the rows as JSON.")] = None,
    cache_dir: CacheDirOption = None,
) -> None:
    """Markdown table comparing MODEL_DIRS on the same patient-wise validation split."""
    from models.compare import compare, markdown

    for folder in model_dirs:
        if not (folder / "val_logits.npz").is_file():
            raise typer.BadParameter(f"{folder} is not a training run folder (no val_logits.npz)")
    rows = compare(
        model_dirs,
        data_dir_of(data_dir),
        tta=tta,
        stress=stress,
        bench=bench,
        cache_dir=_cache_dir(cache_dir),
    )
    typer.echo(markdown(rows))
    if json_out:
        json_out.write_text(json.dumps(rows, indent=1) + "\n")


@model_app.command("stress-test")
def stress_test_command(data_dir: DataDirArgument = None, model_dir: ModelDir = None) -> None:
    """Validation AUC and operating points under gamma, blur, JPEG, equalisation, crop and pad."""
    from models.robustness import stress_test

    typer.echo(json.dumps(stress_test(data_dir_of(data_dir), model_dir), indent=2))


@model_app.command("evaluate")
def evaluate_command(
    data_dir: DataDirArgument = None,
    model_dir: ModelDir = None,
    roc_png: Annotated[Path, typer.Option("--roc-png", help="Where to write the ROC curve.")] = Path(
        "roc.png"
    ),
    split: Annotated[
        Split, typer.Option(help="'val': only the validation patients of the shipped split file.")
    ] = Split.all,
    batch_size: Annotated[int, typer.Option(min=1, max=512, help="Images per model call.")] = default_of(
        "batch_size"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="Worklist database whose active calibration is evaluated too. Default: the database_url"
            " setting (CXR_TRIAGE_DATABASE_URL or the environment file, through Settings), else the local"
            " one.",
        ),
    ] = None,
    external: Annotated[
        Path | None,
        typer.Option(
            help="Also run the shift check on this folder of other hospitals' films (laid out like"
            " external-cxr: manifest.csv with file, label, view, patient): AUC with a by-patient bootstrap"
            " CI, by view, films the input checks turn away, and the border probes. Never fit thresholds"
            " on it.",
            exists=True,
            file_okay=False,
        ),
    ] = None,
    border_probes: Annotated[
        bool,
        typer.Option(
            "--border-probes",
            help="Also score the selected films of DATA_DIR with the outer 8 % / 12 % of each side replaced"
            " by mean grey or by black: a model that reads the lungs loses almost nothing.",
        ),
    ] = False,
) -> None:
    """Score DATA_DIR through the serving path; print ROC AUC and both operating points.

    With bootstrap 95 % confidence intervals, at the model's own thresholds and at the active
    site calibration's (`cxr-triage model calibrations`); `--external` adds the shift check and
    `--border-probes` the border probes.
    """
    folder = data_dir_of(data_dir)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.evaluate import evaluate

    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("scoring", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = evaluate(
            folder, model_dir, roc_png, batch_size=batch_size, split=split.value, progress=progress
        )
    from worker.cli.calibration_commands import add_active_calibration  # issue 12: site calibration

    add_active_calibration(report, database_url, model_dir)
    shift = _shift_checks(folder, model_dir, split, external, border_probes)
    if as_json:
        typer.echo(json.dumps(report.as_dict() | shift, indent=2))
        return
    from models.external import shift_text

    typer.echo("\n".join([report.text(), *shift_text(shift)]))


def _shift_checks(
    folder: Path, model_dir: Path | None, split: Split, external: Path | None, border_probes: bool
) -> dict:
    """The shift check and the border probes that were asked for (an empty dict when none was)."""
    if external is None and not border_probes:
        return {}
    import numpy as np

    from models import default_model_dir
    from models.evaluate import select_samples
    from models.external import border_probes as probes
    from models.external import external_check
    from pipeline.decode import decode_file
    from pipeline.inference import Scorer

    scorer = Scorer.load(model_dir or default_model_dir())
    out: dict = {}
    if border_probes:
        samples = select_samples(folder, split.value)
        labels = np.array([s.pneumonia for s in samples])
        with console.status(f"border probes on {len(samples)} films"):
            out["border_probes"] = probes(scorer, [decode_file(s.path).pixels for s in samples], labels)
    if external is not None:
        with console.status("shift check on the external films"):
            out["external"] = external_check(scorer, external)
    return out


@model_app.command("export-lite")
def export_lite_command(model_dir: ModelDir = None) -> None:
    """Export the model's serving graph for LiteRT (model.tflite beside the Keras model).

    CPU-only machines then score without importing TensorFlow (~12 CPU s and ~1 GB less in every
    process that scores). The export is checked against the Keras model before it is written; run it
    again after the model or its out-of-distribution guard (`model fit-ood`) changes: until then
    TensorFlow serves the model.
    """
    from models.lite import export_lite

    directory = model_dir or default_model_dir()
    sidecar = export_lite(directory)
    worst = max(sidecar["max_abs_difference"].values())
    typer.echo(
        f"wrote {directory}/model.tflite ({sidecar['exported_with']}; largest output difference {worst:.2g})"
    )


@model_app.command("attention")
def attention_command(
    model_dirs: Annotated[list[Path], typer.Argument(help="Model or training run folders.", exists=True)],
    data_dir: DataDirOption = None,
    member: Annotated[
        int | None, typer.Option(help="Map of this member of an ensemble only (its index), not the average.")
    ] = None,
) -> None:
    """Where the Grad-CAM mass falls on the validation films, by class: lung fields or borders.

    A markdown table of the mass shares in the central thoracic box, the border frame, the corners and
    the top band (neck, shoulders). A uniform map would give each region its area share (first row).
    Shortcut cues (side markers, neck, arms, borders) show as mass outside the central box.
    """
    from models.attention import validation_shares

    regions = ("central", "border", "corners", "top_band")
    typer.echo(
        "| model | films with a map (normal / pneumonia) | "
        + " | ".join(f"{region}: normal / pneumonia / all" for region in regions)
        + " | films with > half in the centre |"
    )
    typer.echo("|---" * (len(regions) + 3) + "|")
    for folder in model_dirs:
        shares = validation_shares(data_dir_of(data_dir), folder, member)
        normal, pneumonia, both = shares["normal"], shares["pneumonia"], shares["all"]
        if folder is model_dirs[0]:
            typer.echo(
                "| area share (uniform map) | | "
                + " | ".join(f"{both.area[r]:.2f}" for r in regions)
                + " | |"
            )
        cells = [f"{normal.mean[r]:.3f} / {pneumonia.mean[r]:.3f} / {both.mean[r]:.3f}" for r in regions]
        typer.echo(
            f"| {folder.name} | {normal.films} / {pneumonia.films} | "
            + " | ".join(cells)
            + f" | {both.central_majority:.0%} |"
        )


def explain_command(
    file: Annotated[Path, typer.Argument(help="DICOM, PNG or JPEG chest radiograph.", exists=True)],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file for the heat map overlay.")],
    model_dir: ModelDir = None,
) -> None:
    """Score FILE and write a heat map (class activation map) of where the pneumonia score came from.

    The map comes out of the serving graph with the score (LiteRT on CPU; no TensorFlow), on the
    film at its own size; for a model that reads the lung crop it covers the crop. A research
    visualisation, not a diagnosis.
    """
    from PIL import Image

    from pipeline.cam import LABEL, blend_rgb, colour_scale
    from pipeline.decode import decode_file
    from pipeline.errors import ImageProblem
    from pipeline.inference import Scorer

    try:
        grey = decode_file(file).pixels
    except ImageProblem as exc:
        console.print(f"cannot explain {file.name}: {exc}")
        raise typer.Exit(2) from exc
    scorer = Scorer.load(model_dir or default_model_dir(), features=True)
    score = scorer.score_batch(scorer.model_input(grey)[0][None])[0]
    try:
        heat = scorer.film_heatmap(grey)
    except ValueError as exc:
        console.print(f"cannot explain {file.name}: {exc}")
        raise typer.Exit(2) from exc
    picture = blend_rgb(grey, heat)
    scale = colour_scale(picture.shape[1], max(4, picture.shape[0] // 60))  # low heat left, high right
    Image.fromarray(np.vstack([picture, scale]), mode="RGB").save(output)
    viral = "" if score.viral_probability is None else f", P(viral | pneumonia) {score.viral_probability:.3f}"
    typer.echo(
        f"{file.name}: pneumonia probability {score.pneumonia_probability:.3f} "
        f"({scorer.category(score.pneumonia_probability)}){viral}; heat map ({LABEL}) written to {output}"
    )


# -- site calibration and the out-of-distribution guard (issue 12; worker/cli/calibration_commands.py) --
from worker.cli.calibration_commands import (  # noqa: E402 - registered after the core model commands
    calibrate_command,
    calibrations_command,
    fit_ood_command,
)

model_app.command("calibrate")(calibrate_command)
model_app.command("calibrations")(calibrations_command)
model_app.command("fit-ood")(fit_ood_command)
