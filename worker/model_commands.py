"""``cxr-triage model train|evaluate`` and ``cxr-triage explain``: the model's command line."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from models import default_model_dir
from models.data import DEFAULT_DATA_DIR

console = Console(stderr=True)

model_app = typer.Typer(
    help="Train, evaluate and inspect the pneumonia model (research triage aid, not a diagnostic device).",
    no_args_is_help=True,
)

ModelDirOption = Annotated[
    Path | None,
    typer.Option(
        "--model-dir",
        envvar="CXR_TRIAGE_MODEL_DIR",
        show_envvar=True,
        help="Model folder (metadata.json + model.keras). Default: the shipped model.",
    ),
]


class Split(StrEnum):
    """Which files of a training-layout folder to evaluate."""

    all = "all"
    val = "val"


@model_app.command("train")
def train_command(
    data_dir: Annotated[
        Path, typer.Argument(help="Folder with NORMAL/ and PNEUMONIA/ sub-folders.")
    ] = DEFAULT_DATA_DIR,
    arch: Annotated[str, typer.Option(help="baseline, resnet or mobilenet.")] = "resnet",
    epochs: Annotated[int, typer.Option(min=1, help="Training epochs (fixed cosine schedule).")] = 30,
    seed: Annotated[int, typer.Option(help="Random seed (weights, shuffling, augmentation).")] = 1337,
    size: Annotated[int, typer.Option(min=32, max=512, help="Square input size in pixels.")] = 128,
    augment: Annotated[
        str, typer.Option(help="Augmentation preset: 'standard' or 'strong' (wider zoom, black borders).")
    ] = "standard",
    out: Annotated[
        Path, typer.Option(help="Output folder for model.keras, metadata.json and history.json.")
    ] = Path("models/shipped"),
) -> None:
    """Train on the patient-wise split (models/splits/val_patients.txt), calibrate, write OUT.

    Validation patients are never trained on; temperature and thresholds are fitted on them.
    Expect about 15-30 s per epoch at 128 px on a 2-core CPU.
    """
    from models.augment import PRESETS
    from models.train import TrainConfig, train

    if augment not in PRESETS:
        raise typer.BadParameter(f"choose one of {', '.join(sorted(PRESETS))}", param_hint="--augment")
    cfg = TrainConfig(
        arch=arch, epochs=epochs, seed=seed, size=size, data_dir=str(data_dir), augment=PRESETS[augment]
    )

    def log(line: str) -> None:
        console.print(line, highlight=False)

    metadata = train(cfg, out, log=log)
    typer.echo(json.dumps(metadata, indent=2))


@model_app.command("evaluate")
def evaluate_command(
    data_dir: Annotated[Path, typer.Argument(help="Folder with NORMAL/ and PNEUMONIA/ sub-folders.")],
    model_dir: ModelDirOption = None,
    roc_png: Annotated[Path, typer.Option("--roc-png", help="Where to write the ROC curve.")] = Path(
        "roc.png"
    ),
    split: Annotated[
        Split, typer.Option(help="'val': only the validation patients of the shipped split file.")
    ] = Split.all,
    batch_size: Annotated[int, typer.Option(min=1, max=512, help="Images per model call.")] = 32,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            envvar="CXR_TRIAGE_DATABASE_URL",
            help="Worklist database whose active calibration is evaluated too. Default: the local one.",
        ),
    ] = None,
) -> None:
    """Score DATA_DIR through the serving path; print ROC AUC and both operating points.

    With bootstrap 95 % confidence intervals, at the model's own thresholds and at the active
    site calibration's (`cxr-triage model calibrations`).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from models.evaluate import evaluate

    with Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as bar:
        task = bar.add_task("scoring", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        report = evaluate(
            data_dir, model_dir, roc_png, batch_size=batch_size, split=split.value, progress=progress
        )
    from worker.calibration_commands import add_active_calibration  # issue 12: site calibration

    add_active_calibration(report, database_url, model_dir)
    typer.echo(json.dumps(report.as_dict(), indent=2) if as_json else report.text())


def explain_command(
    file: Annotated[Path, typer.Argument(help="DICOM, PNG or JPEG chest radiograph.", exists=True)],
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file for the Grad-CAM overlay.")],
    model_dir: ModelDirOption = None,
) -> None:
    """Score FILE and write a Grad-CAM overlay of where the pneumonia score came from."""
    from models.explain import gradcam, write_overlay
    from pipeline.decode import decode_file
    from pipeline.errors import ImageProblem
    from pipeline.inference import Scorer
    from pipeline.normalise import to_model_input

    try:
        grey = decode_file(file).pixels
    except ImageProblem as exc:
        console.print(f"cannot explain {file.name}: {exc}")
        raise typer.Exit(2) from exc
    directory = model_dir or default_model_dir()
    scorer = Scorer.load(directory)
    score = scorer.score_batch(to_model_input(grey, scorer.input_size)[None])[0]
    write_overlay(grey, gradcam(directory, grey), output)
    viral = "" if score.viral_probability is None else f", P(viral | pneumonia) {score.viral_probability:.3f}"
    typer.echo(
        f"{file.name}: pneumonia probability {score.pneumonia_probability:.3f} "
        f"({scorer.category(score.pneumonia_probability)}){viral}; overlay written to {output}"
    )


# -- site calibration and the out-of-distribution guard (issue 12; worker/calibration_commands.py) --
from worker.calibration_commands import (  # noqa: E402 - registered after the core model commands
    calibrate_command,
    calibrations_command,
    fit_ood_command,
)

model_app.command("calibrate")(calibrate_command)
model_app.command("calibrations")(calibrations_command)
model_app.command("fit-ood")(fit_ood_command)
