"""Shared helpers of the benchmarks: machine description, RESULTS.md, generated corpora, RSS sampling.

Corpora are generated from the Kermany training films (``/work/shared/data/kermany-cxr224/train``,
override with ``CXR_BENCH_SOURCE``) and cached under ``.work/bench/`` (gitignored). A corpus folder is
complete once its ``manifest.json`` exists; an interrupted generation is redone from scratch.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
RESULTS = BENCH_DIR / "RESULTS.md"
WORK = ROOT / ".work" / "bench"
SOURCE = Path(os.environ.get("CXR_BENCH_SOURCE", "/work/shared/data/kermany-cxr224/train"))
VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "cxr-triage") if (VENV_BIN / "cxr-triage").exists() else "cxr-triage"
PG_ADMIN_DSN = os.environ.get("CXR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CXR_BENCH_REDIS", "redis://127.0.0.1:6379/13")

#: Corpus layout version: bump when the generator changes so stale caches are not reused.
CORPUS_VERSION = 1
#: Side of the generated full-size films.
FILM_SIDE = 2048
#: Share of each format in the mixed corpus.
MIX = {"jpeg": 0.35, "png": 0.25, "dicom12": 0.25, "dicom-j2k": 0.15}


def log(message: str) -> None:
    """Progress line on stderr with the UTC time."""
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- machine and run description ------------------------------------------------------------------
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    return float("nan")


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, {ram_gib():.1f} GiB RAM, no GPU used"


def git_revision() -> str:
    """``git rev-parse --short HEAD``, marked ``+dirty`` when tracked files outside bench/ differ."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return rev + ("+dirty" if dirty else "")


HEAVY_PATTERN = r"models\.(train|compare|evaluate|robustness|ensemble)|cxr-triage model"


def training_running() -> bool:
    """True while model training or evaluation runs on this machine (CPU contention)."""
    result = subprocess.run(["pgrep", "-f", HEAVY_PATTERN], capture_output=True, text=True)
    return bool(result.stdout.strip())


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    ticks = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                raw = handle.read()
        except OSError:
            continue
        name = raw[raw.find("(") + 1 : raw.rfind(")")]
        fields = raw.rsplit(")", 1)[1].split()
        ticks[int(entry)] = (int(fields[11]) + int(fields[12]), name)
    return ticks


def other_cpu_load(seconds: float = 2.0) -> tuple[float, list[str]]:
    """CPU used by processes outside this benchmark's own tree over ``seconds``: (cores, top users)."""
    ours = set(descendants(os.getpid()))
    before = _cpu_ticks()
    time.sleep(seconds)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    users = []
    for pid, (t1, name) in after.items():
        if pid in ours or pid not in before:
            continue
        cores = (t1 - before[pid][0]) / hz / seconds
        if cores > 0.02:
            users.append((cores, pid, name))
    users.sort(reverse=True)
    total = sum(u[0] for u in users)
    return total, [f"{name} (pid {pid}) {100 * cores:.0f} %" for cores, pid, name in users[:4]]


TRAINING_AT_START = training_running()
_LOAD_AT_START: tuple[float, list[str]] | None = None


def note_load_at_start() -> None:
    """Sample the CPU load of other processes before measuring (reported with the figures)."""
    global _LOAD_AT_START
    _LOAD_AT_START = other_cpu_load()
    if _LOAD_AT_START[0] > 0.2:
        log(f"WARNING: other processes use {_LOAD_AT_START[0]:.1f} cores: {', '.join(_LOAD_AT_START[1])}")


def resolve_model_dir(model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir).resolve()
    if os.environ.get("CXR_TRIAGE_MODEL_DIR"):
        return Path(os.environ["CXR_TRIAGE_MODEL_DIR"]).resolve()
    from models import default_model_dir

    return default_model_dir()


def model_description(model_dir: Path) -> dict:
    """Version, input size and architecture from the model's metadata.json."""
    meta = json.loads((model_dir / "metadata.json").read_text())
    shipped = model_dir.resolve() == (ROOT / "models" / "shipped").resolve()
    return {
        "version": str(meta.get("version")),
        "input_size": int(meta.get("input_size", 0)),
        "architecture": meta.get("architecture", "?"),
        "dir": str(model_dir),
        "shipped": shipped,
    }


def command_line() -> str:
    """The command that produced these figures, as typed (relative to the repository root)."""
    args = [os.path.relpath(a, ROOT) if a.startswith(str(ROOT)) else a for a in sys.argv]
    wrapped = "flock .work/heavy.lock " if _under_flock() else ""
    return f"{wrapped}.venv/bin/python {' '.join(args)}"


def _under_flock() -> bool:
    """True when this process was started by ``flock`` (the heavy-work lock)."""
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(parent) and os.path.basename(parent[0].decode(errors="replace")) == "flock"


def append_results(title: str, model: dict | None, body: str, notes: Iterable[str] = ()) -> str:
    """Append one dated section to bench/RESULTS.md and return it."""
    at_end = training_running()
    at_start = TRAINING_AT_START
    if at_start or at_end:
        when = (
            "at the start and at the end"
            if at_start and at_end
            else ("at the start" if at_start else "at the end")
        )
        contention = f"**model training was running {when} of this run** (figures are pessimistic)"
    else:
        contention = "none (no model training running at the start or the end of this run)"
    lines = [
        f"## {title} - {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "",
        f"* machine: {machine()}",
        f"* git revision: {git_revision()}",
    ]
    if model:
        where = "shipped model" if model["shipped"] else f"NOT the shipped model: {model['dir']}"
        lines.append(
            f"* model: {model['version']} ({model['architecture']}, input {model['input_size']} px; {where})"
        )
    lines.append(f"* command: `{command_line()}`")
    lines.append(f"* CPU contention: {contention}")
    load_end = other_cpu_load()
    for label, load in (("before", _LOAD_AT_START), ("right after", load_end)):
        if load is not None:
            users = f": {', '.join(load[1])}" if load[1] else ""
            lines.append(
                f"* CPU used by other processes {label} the run (2 s sample): {load[0]:.2f} cores{users}"
            )
    lines += [f"* {note}" for note in notes]
    lines += ["", body.rstrip(), "", ""]
    text = "\n".join(lines)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nAppended by the scripts in `bench/` (see bench/README.md). Newest last.\n\n"
        )
    with RESULTS.open("a") as handle:
        handle.write(text)
    return text


def table(header: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100])."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# -- databases ------------------------------------------------------------------------------------
def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def fresh_sqlite(path: Path) -> str:
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    return sqlite_url(path)


def _pg_admin(statement: str) -> None:
    import psycopg

    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(statement)


def fresh_postgres(name: str) -> str:
    """Drop and create database ``name``; return its SQLAlchemy URL."""
    drop_postgres(name)
    _pg_admin(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_postgres(name: str) -> None:
    _pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def flush_redis(url: str = REDIS_URL) -> None:
    import redis

    redis.Redis.from_url(url).flushdb()


# -- process helpers ------------------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def descendants(pid: int) -> list[int]:
    tree = _children_map()
    out, stack = [], [pid]
    while stack:
        current = stack.pop()
        out.append(current)
        stack.extend(tree.get(current, []))
    return out


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


@dataclass
class RssSample:
    t: float
    main: int
    tree: int
    extra: object = None


@dataclass
class RssPoller:
    """Polls the RSS of a process (``main``) and of its whole tree in a thread."""

    pid: int
    interval: float = 0.2
    probe: Callable[[], object] | None = None
    samples: list[RssSample] = field(default_factory=list)
    #: The process of interest is the first child of ``pid`` (``pid`` is a wrapper such as /usr/bin/time).
    main_is_child: bool = False

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            pids = descendants(self.pid)
            main_pid = (pids[1] if len(pids) > 1 else 0) if self.main_is_child else self.pid
            main = rss_bytes(main_pid) if main_pid else 0
            tree = sum(rss_bytes(p) for p in pids)
            extra = self.probe() if self.probe else None
            if main:
                self.samples.append(RssSample(time.monotonic() - start, main, tree, extra))
            self._stop.wait(self.interval)

    def start(self) -> RssPoller:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak_main(self) -> int:
        return max((s.main for s in self.samples), default=0)

    @property
    def peak_tree(self) -> int:
        return max((s.tree for s in self.samples), default=0)


def mib(n: float) -> str:
    return f"{n / 1024 / 1024:.0f} MiB"


@dataclass
class Timed:
    seconds: float
    returncode: int
    stdout: str
    stderr: str
    peak_main: int = 0
    peak_tree: int = 0
    max_rss_time_v: int = 0


def run_timed(
    cmd: list[str], *, env: dict | None = None, poll_rss: bool = False, time_v: bool = False
) -> Timed:
    """Run ``cmd`` to completion, timing its wall clock; optionally poll RSS and use /usr/bin/time -v."""
    full = (["/usr/bin/time", "-v"] + cmd) if time_v else cmd
    environ = dict(os.environ, **(env or {}))
    started = time.perf_counter()
    proc = subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environ)
    poller = RssPoller(proc.pid, main_is_child=time_v).start() if poll_rss else None
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if poller:
        poller.stop()
    max_rss = 0
    if time_v:
        for line in stderr.splitlines():
            if "Maximum resident set size" in line:
                max_rss = int(line.split(":")[1]) * 1024
    return Timed(
        seconds,
        proc.returncode,
        stdout,
        stderr,
        poller.peak_main if poller else 0,
        poller.peak_tree if poller else 0,
        max_rss,
    )


def summary_line(stderr: str) -> str:
    """The ``N files: ... images/s`` summary printed by ``cxr-triage scan``."""
    for line in reversed(stderr.splitlines()):
        if " files: " in line and "images/s" in line:
            return line.strip()
    return ""


def parse_summary(stderr: str) -> dict:
    import re

    line = summary_line(stderr)
    values = {}
    for key in ("scored", "rejected", "failed", "queued"):
        m = re.search(rf"(\d+) {key}", line)
        values[key] = int(m.group(1)) if m else None
    m = re.search(r"(\d+) skipped", line)
    values["skipped"] = int(m.group(1)) if m else None
    m = re.search(r"^(\d+) files", line)
    values["files"] = int(m.group(1)) if m else None
    m = re.search(r"([\d.]+) s, ([\d.]+) images/s", line)
    values["cli_seconds"] = float(m.group(1)) if m else None
    values["cli_rate"] = float(m.group(2)) if m else None
    return values


def terminate(proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """SIGTERM a process we started, then SIGKILL it (and only its own descendants) if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in reversed(descendants(proc.pid)):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=10)


# -- corpora --------------------------------------------------------------------------------------
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
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        log(f"reusing corpus {folder} ({manifest['files']} files)")
        return folder / "files", manifest
    if folder.exists():
        shutil.rmtree(folder)
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
    manifest_path.write_text(json.dumps(manifest))
    return folder / "files", manifest


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


def build_small_tree(
    name: str, n: int, *, per_dir: int = 1000, seed: int = 0, tag: str = ""
) -> tuple[Path, dict]:
    """``n`` small valid unique JPEGs (the 224 px Kermany films, each with a unique COM tag)."""
    folder = WORK / f"{name}-v{CORPUS_VERSION}-n{n}-seed{seed}{tag}"
    manifest_path = folder / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        log(f"reusing tree {folder} ({manifest['files']} files)")
        return folder / "files", manifest
    if folder.exists():
        shutil.rmtree(folder)
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
    manifest = {"files": n, "bytes": total, "per_dir": per_dir}
    manifest_path.write_text(json.dumps(manifest))
    return folder / "files", manifest


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def jpeg_bytes(source: str, side: int, quality: int = 90) -> bytes:
    grey, _ = _grey_2048(source, side)
    buffer = io.BytesIO()
    grey.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def cli(*args: str) -> list[str]:
    return [CLI, *args]


def bench_env(model_dir: Path) -> dict[str, str]:
    """Environment for product subprocesses: the model under test, quiet TensorFlow."""
    return {"CXR_TRIAGE_MODEL_DIR": str(model_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}


def add_common_args(parser) -> None:
    note_load_at_start()
    parser.add_argument(
        "--model-dir", default=None, help="model folder (default: the shipped model models/shipped)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, for development (figures are meaningless)"
    )
    parser.add_argument(
        "--no-append", action="store_true", help="print figures but do not write bench/RESULTS.md"
    )


def make_parser(doc: str, *, common_args: bool = True) -> argparse.ArgumentParser:
    """The parser every benchmark uses: first docstring line as description, the rest as epilog."""
    parser = argparse.ArgumentParser(
        description=doc.splitlines()[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if common_args:
        add_common_args(parser)
    return parser


def publish(args, title: str, model: dict | None, body: str, notes: Iterable[str] = ()) -> None:
    """Print the figures; append them to RESULTS.md unless --quick or --no-append."""
    print(body)
    if args.quick:
        log("--quick: not appended to RESULTS.md")
    elif not args.no_append:
        append_results(title, model, body, notes)
        log(f"appended to {RESULTS}")
