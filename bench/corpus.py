"""Corpora of the benchmarks, generated from the Kermany training films and cached under .work/bench/.

The source is ``$CXR_BENCH_SOURCE``, else ``kermany-cxr224/train`` under ``$CXR_TRIAGE_SHARED``
(default ``../shared``). A corpus folder is complete once its ``manifest.json`` exists; an
interrupted generation is redone from scratch.
"""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from bench.results import ROOT, log

WORK = ROOT / ".work" / "bench"
_SHARED = Path(os.environ.get("CXR_TRIAGE_SHARED", ROOT.parent / "shared"))
SOURCE = Path(os.environ.get("CXR_BENCH_SOURCE", _SHARED / "data" / "kermany-cxr224" / "train"))

#: Corpus layout version: bump when the generator changes so stale caches are not reused.
CORPUS_VERSION = 1
#: Side of the generated full-size films.
FILM_SIDE = 2048
#: Share of each format in the mixed corpus.
MIX = {"jpeg": 0.35, "png": 0.25, "dicom12": 0.25, "dicom-j2k": 0.15}


def source_images(seed: int = 0) -> list[Path]:
    """Kermany training films in a seeded random order."""
    files = sorted(p for p in SOURCE.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
    if not files:
        raise SystemExit(f"no source images under {SOURCE}")
    random.Random(seed).shuffle(files)
    return files


def _grey_2048(source: str, side: int):
    import numpy as np
    from PIL import Image

    with Image.open(source) as image:
        grey = image.convert("L").resize((side, side), Image.Resampling.BICUBIC)
    return grey, np.asarray(grey)


def _dicom_dataset(pixels12, index: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.AccessionNumber = f"BENCH{index:06d}"
    ds.PatientID = f"BENCH{index:06d}"
    ds.PatientName = "Bench^Synthetic"
    ds.PatientAge = "003Y"
    ds.Modality = "CR"
    ds.ViewPosition = "AP"
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels12.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = pixels12.tobytes()
    return ds


def make_film(job: tuple[str, str, str, int, int]) -> tuple[str, str, int]:
    """Write one full-size film; returns (relative path, format, bytes)."""
    source, target, kind, index, side = job
    import numpy as np
    from PIL import Image

    grey, array = _grey_2048(source, side)
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    if kind == "jpeg":
        grey.save(target, format="JPEG", quality=90)
    elif kind == "png":
        if index % 2:  # half the PNGs are 16-bit grey
            Image.fromarray(array.astype(np.uint16) * 257).save(target, format="PNG")
        else:
            grey.save(target, format="PNG")
    else:
        pixels12 = np.round(array.astype(np.float32) / 255.0 * 4095.0).astype(np.uint16)
        ds = _dicom_dataset(pixels12, index)
        if kind == "dicom-j2k":
            from pydicom.uid import JPEG2000Lossless

            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
        ds.save_as(target, enforce_file_format=True)
    return target, kind, os.path.getsize(target)


SUFFIX = {"jpeg": ".jpg", "png": ".png", "dicom12": ".dcm", "dicom-j2k": ".dcm"}


def _plan(n: int, mix: dict[str, float]) -> list[str]:
    counts = {k: int(round(n * share)) for k, share in mix.items()}
    first = next(iter(mix))
    counts[first] += n - sum(counts.values())
    kinds = [k for k, c in counts.items() for _ in range(c)]
    random.Random(1).shuffle(kinds)  # interleave formats in the tree
    return kinds


def build_corpus(
    name: str,
    n: int,
    *,
    mix: dict[str, float] | None = None,
    side: int = FILM_SIDE,
    seed: int = 0,
    workers: int | None = None,
) -> tuple[Path, dict]:
    """Generate (or reuse) a corpus of ``n`` full-size films; returns (folder, manifest)."""
    mix = mix or MIX
    folder = WORK / f"{name}-v{CORPUS_VERSION}-n{n}-s{side}-seed{seed}"
    cached = _reuse(folder, "corpus")
    if cached:
        return cached
    sources = source_images(seed)
    if n > len(sources):
        raise SystemExit(f"asked for {n} films, only {len(sources)} source images")
    kinds = _plan(n, mix)
    jobs = [
        (str(sources[i]), str(folder / "files" / f"d{i // 100:03d}" / f"film{i:05d}{SUFFIX[k]}"), k, i, side)
        for i, k in enumerate(kinds)
    ]
    log(f"generating {n} films ({side}x{side}) into {folder} ...")
    started = time.monotonic()
    entries = []
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        for done, (target, kind, size) in enumerate(pool.map(make_film, jobs, chunksize=4), 1):
            entries.append({"path": os.path.relpath(target, folder / "files"), "format": kind, "bytes": size})
            if done % max(n // 20, 1) == 0 or done == n:
                log(f"  {done}/{n} films ({time.monotonic() - started:.0f} s)")
    by_format: dict[str, int] = {}
    for entry in entries:
        by_format[entry["format"]] = by_format.get(entry["format"], 0) + 1
    manifest = {
        "files": n,
        "side": side,
        "seed": seed,
        "by_format": by_format,
        "bytes": sum(e["bytes"] for e in entries),
        "entries": entries,
    }
    return _complete(folder, manifest)


def corpus_description(manifest: dict) -> str:
    parts = ", ".join(f"{v} {k}" for k, v in sorted(manifest["by_format"].items()))
    return (
        f"{manifest['files']} files ({parts}; {manifest['side']}x{manifest['side']}; "
        f"{manifest['bytes'] / 1e9:.2f} GB) made from Kermany training films"
    )


def tagged_jpeg(data: bytes, tag: str) -> bytes:
    """The same JPEG with a COM segment after SOI: still valid, but unique content (new SHA-256)."""
    assert data[:2] == b"\xff\xd8"
    payload = tag.encode()
    return data[:2] + b"\xff\xfe" + (len(payload) + 2).to_bytes(2, "big") + payload + data[2:]


def _reuse(folder: Path, what: str) -> tuple[Path, dict] | None:
    """A complete cached ``folder`` as (files folder, manifest); an incomplete one, left by an
    interrupted generation, is removed and None returned."""
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        log(f"reusing {what} {folder} ({manifest['files']} files)")
        return folder / "files", manifest
    if folder.exists():
        shutil.rmtree(folder)
    return None


def _complete(folder: Path, manifest: dict) -> tuple[Path, dict]:
    """Write the manifest, last: from now on :func:`_reuse` takes the folder as complete."""
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "files", manifest


def build_small_tree(
    name: str, n: int, *, per_dir: int = 1000, seed: int = 0, tag: str = ""
) -> tuple[Path, dict]:
    """``n`` small valid unique JPEGs (the 224 px Kermany films, each with a unique COM tag)."""
    folder = WORK / f"{name}-v{CORPUS_VERSION}-n{n}-seed{seed}{tag}"
    cached = _reuse(folder, "tree")
    if cached:
        return cached
    sources = [p.read_bytes() for p in source_images(seed)]
    sources = [s for s in sources if s[:2] == b"\xff\xd8"]
    log(f"writing {n} small files into {folder} ...")
    started = time.monotonic()
    total = 0
    for i in range(n):
        directory = folder / "files" / f"lab{i // (per_dir * 10):02d}" / f"day{i // per_dir:04d}"
        if i % per_dir == 0:
            directory.mkdir(parents=True, exist_ok=True)
        data = tagged_jpeg(sources[i % len(sources)], f"cxr-bench {name}{tag} {i}")
        (directory / f"img{i:06d}.jpg").write_bytes(data)
        total += len(data)
        if (i + 1) % max(n // 10, 1) == 0:
            log(f"  {i + 1}/{n} files ({time.monotonic() - started:.0f} s)")
    return _complete(folder, {"files": n, "bytes": total, "per_dir": per_dir})


def sha256_of(path: str | Path) -> str | None:
    """SHA-256 of a file's content; None when it vanished (files are deleted under the chaos runs)."""
    from pipeline.hashing import sha256_file_or_none

    return sha256_file_or_none(path)


def jpeg_bytes(source: str, side: int, quality: int = 90) -> bytes:
    grey, _ = _grey_2048(source, side)
    buffer = io.BytesIO()
    grey.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def distinct_films(count: int, offset: int = 0, source: Path = SOURCE) -> list[Path]:
    """``count`` Kermany JPEGs with distinct content, PNEUMONIA and NORMAL interleaved from ``offset``."""
    normal = sorted((source / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((source / "PNEUMONIA").glob("*.jpeg"))
    mixed = [p for pair in zip(pneumonia, normal + pneumonia[len(normal) :], strict=False) for p in pair]
    mixed += pneumonia[len(normal) * 2 :]
    chosen, seen = [], set()
    for path in mixed[offset:]:
        digest = sha256_of(path)
        if digest in seen:
            continue
        seen.add(digest)
        chosen.append(path)
        if len(chosen) == count:
            break
    if len(chosen) < count:
        raise RuntimeError(f"only {len(chosen)} distinct Kermany files available, {count} asked")
    return chosen
