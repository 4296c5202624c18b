"""Fit the out-of-distribution guard (:mod:`pipeline.ood`) and measure it on a test battery.

Fitting needs no outside data: the training films give the density, the validation films
the cut-off (>= 99.5 % of them kept). The battery holds what the guard must refuse, built
from what is on this machine:

* ``dicom-non-chest``: every decodable non-chest image in ``../shared/data/dicom`` (CT, MR,
  ultrasound, mammography, a non-chest CR, angiography, a canine thorax...), forced past the
  header checks (``pipeline.dicom.check_scope`` is skipped; the first frame of a multi-frame
  object and the mean of colour channels are used);
* ``natural``: the photographs and maps that ship with matplotlib (a portrait, a product
  photo, a logo, an MR slice, elevation maps), whole and as crops;
* ``synthetic``: noise, smooth blobs, gradients, checkerboards, stripes, discs, text;
* ``chest-inverted`` and ``chest-rotated``: validation chest films with grey levels inverted,
  or turned by 90, 180 or 270 degrees, or flipped upside down.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models import data
from pipeline.ood import DEFAULT_KEEP, DEFAULT_SHRINKAGE, OOD_FILE, OodGuard, fit_guard, fit_orientation

Item = tuple[str, str, np.ndarray]  # (category, name, grey levels in [0, 1])


def _minmax(values: np.ndarray) -> np.ndarray | None:
    values = np.asarray(values, dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    return None if high <= low else (values - low) / (high - low)


def forced_dicom_grey(path: Path) -> np.ndarray | None:
    """Grey levels of a DICOM image with the scope checks skipped (None when it has no pixels)."""
    import warnings

    import pydicom

    from pipeline.dicom import ensure_transfer_syntax, to_display_grey

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path, force=True)
            ensure_transfer_syntax(ds)
            pixels = np.asarray(ds.pixel_array)
            frames = int(ds.get("NumberOfFrames", 1) or 1)
            if frames > 1:
                pixels = pixels[0]
            if pixels.ndim == 3:  # colour: channels last
                return _minmax(pixels.mean(axis=-1))
            if pixels.ndim != 2:
                return None
            return to_display_grey(pixels, ds)
    except Exception:  # noqa: BLE001 - undecodable test files are simply not part of the battery
        return None


def dicom_images(dicom_dir: Path) -> Iterator[Item]:
    """Decodable images of the shared DICOM folder, by their INVENTORY.tsv ``nature``.

    ``dicom-non-chest``: everything but real human chest films; ``dicom-chest``: real human
    (adult) chest films, which should be kept although adults are outside the intended use;
    ``dicom-inverted-chest``: a chest film whose header was edited to MONOCHROME1 without
    inverting the pixels, so it displays inverted.
    """
    inventory = dicom_dir / "INVENTORY.tsv"
    with inventory.open(newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            nature = row["nature"]
            if nature.startswith("real CXR pixels, header edited"):
                category = "dicom-inverted-chest"
            elif "chest radiograph" in nature and "non-chest" not in nature:
                category = "dicom-chest"
            else:
                category = "dicom-non-chest"
            grey = forced_dicom_grey(dicom_dir / row["path"])
            if grey is not None and min(grey.shape) >= 16:
                yield category, row["path"], grey


def natural_images() -> Iterator[Item]:
    """Photographs, a logo, an MR slice and elevation maps shipped with matplotlib, plus crops."""
    import matplotlib
    from PIL import Image

    sample = Path(matplotlib.get_data_path()) / "sample_data"
    images: dict[str, np.ndarray] = {}
    for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"):
        if (sample / name).is_file():
            images[name] = np.asarray(Image.open(sample / name).convert("L"), dtype=np.float32) / 255.0
    if (sample / "s1045.ima.gz").is_file():
        with gzip.open(sample / "s1045.ima.gz") as handle:
            raw = np.frombuffer(handle.read(), dtype="<u2")
        images["s1045.ima (MR)"] = _minmax(raw[: 256 * 256].reshape(256, 256))
    for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
        if (sample / name).is_file():
            with np.load(sample / name) as npz:
                images[name] = _minmax(npz[key] if key in npz else npz[npz.files[0]])
    for name, grey in images.items():
        if grey is None:
            continue
        yield "natural", name, grey
        h, w = grey.shape
        for i, (top, left) in enumerate(((0, 0), (0, w // 3), (h // 3, 0), (h // 3, w // 3))):
            yield "natural", f"{name} crop {i}", grey[top : top + 2 * h // 3, left : left + 2 * w // 3]


def synthetic_images(seeds: int = 4, size: int = 224) -> Iterator[Item]:
    """Noise, blobs, gradients, checkerboards, stripes, discs and text."""
    from PIL import Image, ImageDraw, ImageFilter

    rows, cols = np.mgrid[0:size, 0:size] / size
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        blobs = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).filter(
            ImageFilter.GaussianBlur(8 + 4 * seed)
        )
        angle = rng.uniform(0, np.pi)
        text = Image.new("L", (size, size), 255)
        draw = ImageDraw.Draw(text)
        for line in range(8):
            draw.text((8, 8 + 26 * line), f"LOREM IPSUM {seed}{line} DOLOR", fill=0)
        disc = ((rows - rng.uniform(0.3, 0.7)) ** 2 + (cols - rng.uniform(0.3, 0.7)) ** 2) < 0.05
        period = 4 + 6 * seed
        yield from (
            ("synthetic", f"uniform noise {seed}", rng.random((size, size))),
            ("synthetic", f"gaussian noise {seed}", np.clip(rng.normal(0.5, 0.2, (size, size)), 0, 1)),
            ("synthetic", f"smooth blobs {seed}", _minmax(np.asarray(blobs, dtype=np.float32))),
            ("synthetic", f"gradient {seed}", np.cos(angle) * cols + np.sin(angle) * rows),
            (
                "synthetic",
                f"checkerboard {seed}",
                ((rows * size // period + cols * size // period) % 2) * 1.0,
            ),
            ("synthetic", f"stripes {seed}", 0.5 + 0.5 * np.sin(2 * np.pi * cols * (3 + 5 * seed))),
            ("synthetic", f"disc {seed}", disc * 0.8 + rng.random((size, size)) * 0.1),
            ("synthetic", f"text {seed}", np.asarray(text, dtype=np.float32) / 255.0),
        )


CHEST_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "inverted": lambda g: 1.0 - g,
    "rotated 90": lambda g: np.rot90(g, 1),
    "rotated 180": lambda g: np.rot90(g, 2),
    "rotated 270": lambda g: np.rot90(g, 3),
    "upside down": lambda g: g[::-1],
}


def chest_variants(films: list[Path]) -> Iterator[Item]:
    """Validation chest films, inverted, rotated and flipped."""
    from pipeline.decode import decode_file

    for path in films:
        grey = decode_file(path).pixels
        for name, transform in CHEST_TRANSFORMS.items():
            category = "chest-inverted" if name == "inverted" else "chest-rotated"
            yield category, f"{path.name} {name}", np.ascontiguousarray(transform(grey))


def perturbed_chests(films: list[Path]) -> Iterator[Item]:
    """Validation chest films under the acquisition-like perturbations of ``models.robustness``:
    real chest films the guard should keep."""
    from models.robustness import PERTURBATIONS
    from pipeline.decode import decode_file

    for path in films:
        grey = decode_file(path).pixels
        for name, perturb in PERTURBATIONS.items():
            yield f"chest-kept-{name}", path.name, np.ascontiguousarray(perturb(grey), dtype=np.float32)


def battery(dicom_dir: Path | None, films: list[Path]) -> Iterator[Item]:
    """The whole battery (DICOM part only when the shared folder is there)."""
    if dicom_dir is not None and (dicom_dir / "INVENTORY.tsv").is_file():
        yield from dicom_images(dicom_dir)
    yield from natural_images()
    yield from synthetic_images()
    yield from chest_variants(films)
    yield from perturbed_chests(films)


@dataclass
class BatteryResult:
    """Rejection rate per category (and per chest transform)."""

    rows: list[tuple[str, str, float, bool]]  # (category, name, distance, rejected)

    def rates(self) -> dict[str, dict]:
        out: dict[str, dict] = {}
        for category, name, _, rejected in self.rows:
            key = category
            if category == "chest-rotated":
                key = "chest-" + name.split(" ", 1)[1].replace(" ", "-")
            entry = out.setdefault(key, {"images": 0, "rejected": 0})
            entry["images"] += 1
            entry["rejected"] += int(rejected)
        for entry in out.values():
            entry["rejection_rate"] = round(entry["rejected"] / entry["images"], 4)
        return out


def run_battery(scorer, items: Iterator[Item], batch: int = 64) -> BatteryResult:
    """Distance and verdict of the scorer's input checks for every item (the serving preprocessing:
    the density guard, the orientation check and, for a lung-crop model, the lung fields)."""
    rows: list[tuple[str, str, float, bool]] = []
    pending: list[Item] = []

    def flush() -> None:
        if not pending:
            return
        made = [scorer.model_input(grey) for _, _, grey in pending]
        scores = scorer.score_batch(np.stack([x for x, _ in made]))
        for (category, name, _), (_, fields), score in zip(pending, made, scores, strict=True):
            rejected = scorer.input_check(score, fields) is not None
            rows.append((category, name, float(score.ood_distance), rejected))
        pending.clear()

    for item in items:
        pending.append(item)
        if len(pending) == batch:
            flush()
    flush()
    return BatteryResult(rows)


def serving_features(scorer, paths: list[Path], batch: int = 64) -> np.ndarray:
    """Penultimate features of files through the serving path (decode -> the model's input)."""
    return readable_features(scorer, paths, batch, skip_unreadable=False)[0]


def readable_features(
    scorer, paths: list[Path], batch: int = 64, skip_unreadable: bool = True
) -> tuple[np.ndarray, list[Path]]:
    """(features, the files they belong to) through the serving path; with ``skip_unreadable``, a
    file the serving path would reject or fail (too small, unreadable) is left out, as it never
    reaches the guard, instead of stopping the fit."""
    from pipeline.decode import decode_file
    from pipeline.errors import ImageProblem

    chunks, kept, pending = [], [], []
    for path in paths:
        try:
            grey = decode_file(path).pixels
        except ImageProblem:
            if not skip_unreadable:
                raise
            continue
        kept.append(path)
        pending.append(scorer.model_input(grey)[0])
        if len(pending) == batch:
            chunks.append(scorer.features(np.stack(pending)))
            pending = []
    if pending:
        chunks.append(scorer.features(np.stack(pending)))
    return (np.concatenate(chunks) if chunks else np.empty((0, 0))), kept


def turned_features(scorer, paths: list[Path], batch: int = 64) -> np.ndarray:
    """Features of every film under every :data:`CHEST_TRANSFORMS` entry (rows: film-major)."""
    from pipeline.decode import decode_file

    chunks, pending = [], []
    for path in paths:
        grey = decode_file(path).pixels
        pending.extend(
            scorer.model_input(np.ascontiguousarray(turn(grey)))[0] for turn in CHEST_TRANSFORMS.values()
        )
        if len(pending) >= batch:
            chunks.append(scorer.features(np.stack(pending)))
            pending = []
    if pending:
        chunks.append(scorer.features(np.stack(pending)))
    return np.concatenate(chunks)


#: Training films used for the orientation check (each also turned 5 ways): every n-th one.
ORIENTATION_STRIDE = 2


#: Label of the films of other chest collections in the density fit (0 normal, 1 pneumonia).
OTHER_CHEST = 2


def image_files(folder: Path) -> list[Path]:
    """The image files of a folder (sorted, not recursive)."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in data.IMAGE_SUFFIXES)


def fit_and_write(
    data_dir: Path,
    model_dir: Path,
    keep: float = DEFAULT_KEEP,
    shrinkage: float = DEFAULT_SHRINKAGE,
    out: Path | None = None,
    other_chest: list[Path] = (),
) -> OodGuard:
    """Fit the guard on the training films of the shipped split, cut-off on validation; write ``ood.npz``.

    Density on all training films; orientation check on every other training film against
    its own rotations, flips and inversion; both cut-offs on the validation films.

    ``other_chest``: upright frontal chest films of other populations (adults, other hospitals);
    those the serving path cannot read are left out.
    They join the density as a third cloud and the orientation check's upright films (their turned
    copies its turned ones), so that the guard asks "is this an upright chest film" and not "is this
    a film like the training hospital's". The cut-offs stay on the training hospital's validation
    films; the score and its thresholds never see these films.
    """
    from pipeline.inference import Scorer

    scorer = Scorer.load(model_dir, features=True)
    train, val = data.partition(data.list_samples(data_dir), data.read_split())
    train_features = serving_features(scorer, [s.path for s in train])
    val_features = serving_features(scorer, [s.path for s in val])
    other_features, other = readable_features(scorer, list(other_chest))
    if not other:
        other_features = np.empty((0, train_features.shape[1]))
    guard = fit_guard(
        np.vstack([train_features, other_features]),
        np.concatenate([[s.pneumonia for s in train], np.full(len(other), OTHER_CHEST)]),
        val_features,
        keep=keep,
        shrinkage=shrinkage,
        info={
            "model_version": scorer.version,
            "split_file": "models/splits/val_patients.txt",
            "other_chest_films": len(other),
        },
    )
    chosen = list(range(0, len(train), ORIENTATION_STRIDE))
    turned = turned_features(scorer, [train[i].path for i in chosen] + other)
    within = guard.distances(turned) <= guard.cutoff  # turned films the density alone lets through
    upright = np.vstack([train_features[chosen], other_features])
    guard.orientation, info = fit_orientation(upright, turned, val_features, keep=keep, turned_kept=within)
    guard.info.update(info)
    guard.save(out or Path(model_dir) / OOD_FILE)
    return guard


def turned_rates(guard: OodGuard, upright: np.ndarray, turned: np.ndarray) -> dict[str, dict]:
    """Rejection rate per transform (and upright), by the density cut-off alone and by the whole guard.

    ``turned`` rows are film-major as from :func:`turned_features`.
    """
    names = list(CHEST_TRANSFORMS)
    out = {}
    for name, feats in [("upright", upright)] + [(n, turned[i :: len(names)]) for i, n in enumerate(names)]:
        density = guard.distances(feats) > guard.cutoff
        out[name] = {
            "films": int(len(feats)),
            "density_only": round(float(density.mean()), 4),
            "with_orientation": round(float(guard.flags(feats).mean()), 4),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m models.ood_fit DATA_DIR [--model-dir D]``: rates on all validation films, turned.

    Prints, per transform, the share of validation films rejected by the density cut-off alone
    and by the whole guard (with the orientation check, when ``ood.npz`` has one).
    """
    import argparse
    import json

    from pipeline.inference import Scorer

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("--model-dir", type=Path, default=Path(__file__).parent / "shipped")
    args = parser.parse_args(argv)
    scorer = Scorer.load(args.model_dir, features=True)
    _, val = data.partition(data.list_samples(args.data_dir), data.read_split())
    paths = [s.path for s in val]
    rates = turned_rates(scorer.ood, serving_features(scorer, paths), turned_features(scorer, paths))
    print(json.dumps({"model_version": scorer.version, "ood": scorer.ood.info, "rates": rates}, indent=1))


if __name__ == "__main__":
    main()
