"""Training data: file listing, patient ids, labels, the patient-wise split and cached arrays.

Nothing here knows where the data lives: every function takes the folder as an argument (the CLI
fills it from ``--data-dir`` / ``CXR_TRIAGE_DATA_DIR``, the one data-location setting).

Every training image goes through the serving path (:func:`pipeline.decode.decode_file`
then :func:`pipeline.normalise.resize_square`) once; the resized grey levels in [0, 1]
are cached as float32 so that augmentation and standardisation happen at training time.
"""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.decode import decode_file
from pipeline.hashing import sha256_file
from pipeline.lungs import LungModel, lung_crop
from pipeline.normalise import resize_square

CLASSES = ("NORMAL", "PNEUMONIA")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".dcm")
#: The patient-wise validation split: package data, so it ships in the wheel with the model.
SPLIT_FILE = Path(__file__).resolve().parent / "splits" / "val_patients.txt"

_PERSON = re.compile(r"^person(\d+)_(bacteria|virus)_", re.IGNORECASE)
_NORMAL = re.compile(r"^(?:NORMAL2-)?IM-(\d+)-", re.IGNORECASE)


@dataclass(frozen=True)
class Sample:
    """One training file with its labels and patient key."""

    path: Path
    pneumonia: int  # 1 = pneumonia, 0 = normal
    viral: int  # 1 = viral, 0 = bacterial, -1 = not applicable (normal)
    patient: str

    @property
    def name(self) -> str:
        """Class folder and file name, e.g. ``PNEUMONIA/person1_virus_6.jpeg``."""
        return f"{self.path.parent.name}/{self.path.name}"


def patient_key(file_name: str) -> str:
    """Patient key from a Kermany file name.

    ``personN_*`` -> ``personN``; ``IM-XXXX-*`` and ``NORMAL2-IM-XXXX-*`` -> ``normal-XXXX``
    (both normal series are merged under one key, which can only make the split stricter).
    """
    match = _PERSON.match(file_name)
    if match:
        return f"person{int(match.group(1))}"
    match = _NORMAL.match(file_name)
    if match:
        return f"normal-{int(match.group(1))}"
    return f"file-{file_name}"


def _viral_label(file_name: str, pneumonia: int) -> int:
    if not pneumonia:
        return -1
    lowered = file_name.lower()
    if "_virus" in lowered:
        return 1
    if "_bacteria" in lowered:
        return 0
    return -1


def list_samples(data_dir: str | Path) -> list[Sample]:
    """All images under ``data_dir/NORMAL`` and ``data_dir/PNEUMONIA``, sorted by name."""
    data_dir = Path(data_dir)
    samples = []
    for label, cls in enumerate(CLASSES):
        folder = data_dir / cls
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                samples.append(Sample(path, label, _viral_label(path.name, label), patient_key(path.name)))
    if not samples:
        raise FileNotFoundError(f"no NORMAL/ or PNEUMONIA/ images under {data_dir}")
    return samples


def _file_hash(path: Path) -> str:
    return sha256_file(path)


def split_groups(samples: list[Sample]) -> dict[str, str]:
    """Map each patient key to a group key; patients sharing a byte-identical file share a group."""
    parent: dict[str, str] = {s.patient: s.patient for s in samples}

    def find(key: str) -> str:
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    by_hash: dict[str, list[str]] = defaultdict(list)
    for sample in samples:
        by_hash[_file_hash(sample.path)].append(sample.patient)
    for patients in by_hash.values():
        for other in patients[1:]:
            a, b = find(patients[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {key: find(key) for key in parent}


def make_split(samples: list[Sample], val_fraction: float = 0.17, seed: int = 20240) -> set[str]:
    """Seeded, stratified, patient-wise validation split; returns the validation patient keys.

    Groups (patients joined by duplicate files) are stratified by their majority label
    (normal / bacterial / viral) and a ``val_fraction`` share of each stratum goes to validation.
    """
    groups = split_groups(samples)
    members: dict[str, set[str]] = defaultdict(set)
    stratum_votes: dict[str, list[int]] = defaultdict(list)
    for sample in samples:
        group = groups[sample.patient]
        members[group].add(sample.patient)
        stratum_votes[group].append(0 if not sample.pneumonia else 1 + max(sample.viral, 0))
    strata: dict[int, list[str]] = defaultdict(list)
    for group in sorted(members):
        votes = stratum_votes[group]
        strata[max(set(votes), key=votes.count)].append(group)
    rng = np.random.default_rng(seed)
    val: set[str] = set()
    for stratum in sorted(strata):
        keys = sorted(strata[stratum])
        rng.shuffle(keys)
        for group in keys[: round(len(keys) * val_fraction)]:
            val |= members[group]
    return val


def write_split(val_patients: set[str], path: Path = SPLIT_FILE, seed: int | None = None) -> None:
    """Write the validation patient keys, one a line, under a short header."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = [
        "# cxr-triage validation split: patient keys (one a line), see models/data.py:patient_key",
        f"# seed={seed} made by models.data.make_split over kermany-cxr224/train",
    ]
    path.write_text("\n".join(header + sorted(val_patients)) + "\n")


def read_split(path: Path = SPLIT_FILE) -> set[str]:
    """Validation patient keys from a split file."""
    lines = Path(path).read_text().splitlines()
    return {line.strip() for line in lines if line.strip() and not line.startswith("#")}


def partition(samples: list[Sample], val_patients: set[str]) -> tuple[list[Sample], list[Sample]]:
    """(train, val) samples for a set of validation patient keys."""
    train = [s for s in samples if s.patient not in val_patients]
    val = [s for s in samples if s.patient in val_patients]
    return train, val


def load_grey(path: Path, size: int) -> np.ndarray:
    """Serving-path decode and square resize: (size, size) float32 grey levels in [0, 1]."""
    return resize_square(decode_file(path).pixels, size)


def load_lung_crop(path: Path, size: int, lungs: LungModel, suppress: bool = False) -> np.ndarray:
    """Serving-path decode, cut to the lung box (:func:`pipeline.lungs.lung_crop`), square resize."""
    return resize_square(lung_crop(decode_file(path).pixels, lungs, suppress)[0], size)


def cached_arrays(
    samples: list[Sample],
    size: int,
    cache_dir: str | Path | None = None,
    progress: bool = False,
    lung_model: str | Path | None = None,
    suppress: bool = False,
) -> np.ndarray:
    """(N, size, size) float32 resized grey images for ``samples``, cached in ``cache_dir`` if given.

    With ``lung_model`` (a ``lungs.tflite``), each film is first cut to its lung box, as served
    (``suppress``: and what lies outside the lung fields set to the lungs' median grey).
    """
    names = "\n".join(s.name for s in samples)
    crop = sha256_file(Path(lung_model))[:16] if lung_model else "none"
    digest = hashlib.sha256(f"{size}\n{names}".encode()).hexdigest()[:16]
    prefix = "grey" if not lung_model else f"{'lungsup' if suppress else 'lungs'}{crop}"
    cache = Path(cache_dir) / f"{prefix}_{size}_{digest}.npy" if cache_dir else None
    if cache and cache.exists():
        return np.load(cache, mmap_mode=None)
    arrays = np.empty((len(samples), size, size), dtype=np.float32)
    lungs = LungModel(lung_model, threads=1) if lung_model else None
    for i, sample in enumerate(samples):
        if lungs is None:
            arrays[i] = load_grey(sample.path, size)
        else:
            arrays[i] = load_lung_crop(sample.path, size, lungs, suppress)
        if progress and i % 500 == 0:
            print(f"cached {i}/{len(samples)}", flush=True)
    if cache is None:
        return arrays
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, arrays)
    tmp.replace(cache)
    return arrays


def labels(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(pneumonia, viral) label arrays; viral is -1 where not applicable."""
    return (
        np.array([s.pneumonia for s in samples], dtype=np.float32),
        np.array([s.viral for s in samples], dtype=np.float32),
    )
