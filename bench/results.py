"""Results of the benchmarks: machine and revision, contention, tables, bench/RESULTS.md, scan summaries.

Every figure appended to RESULTS.md names the machine, the git revision and the CPU contention
during the run; :func:`run_started` (called once arguments are parsed) opens that window.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path

import psutil

from bench import processes

#: The repository root: every benchmark path is under it (the one definition; common and corpus use it).
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"


def log(message: str) -> None:
    """Progress line on stderr with the UTC time."""
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- machine and revision: the one bench-level copy (models.train has the product's git_revision) --
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gib() -> float:
    return psutil.virtual_memory().total / 1024**3


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_model()}, {ram_gib():.1f} GiB RAM, no GPU used"


def git_revision(exclude: str = "bench") -> str:
    """``git rev-parse --short HEAD``, marked ``+dirty`` when tracked files outside ``exclude`` differ."""
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", f":!{exclude}"],
            capture_output=True,
            text=True,
            cwd=ROOT,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return rev + ("+dirty" if dirty else "")


# -- contention during a run ---------------------------------------------------------------------
_RUN: dict = {}


def run_started() -> None:
    """Open the contention window: training running now? CPU of others from now on (no sleep)."""
    _RUN["training"] = processes.training_running()
    _RUN["others"] = processes.CpuOfOthers().start()


def _contention_lines() -> list[str]:
    at_start, at_end = _RUN.get("training", False), processes.training_running()
    if at_start or at_end:
        when = (
            "at the start and at the end"
            if at_start and at_end
            else ("at the start" if at_start else "at the end")
        )
        training = f"**model training was running {when} of this run** (figures are pessimistic)"
    else:
        training = "none (no model training running at the start or the end of this run)"
    lines = [f"* CPU contention: {training}"]
    others = _RUN.get("others")
    if others is not None:
        cores, users = others.cores()
        if cores > 0.2:
            log(f"WARNING: other processes used {cores:.1f} cores during the run: {', '.join(users)}")
        top = f": {', '.join(users)}" if users else ""
        lines.append(f"* CPU used by other processes during the run (average): {cores:.2f} cores{top}")
    return lines


# -- RESULTS.md ----------------------------------------------------------------------------------
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
    wrapped = "flock .work/heavy.lock " if processes.under_flock() else ""
    return f"{wrapped}.venv/bin/python {' '.join(args)}"


def append_results(title: str, model: dict | None, body: str, notes: Iterable[str] = ()) -> str:
    """Append one dated section to bench/RESULTS.md and return it."""
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
    lines += _contention_lines()
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


def publish(args, title: str, model: dict | None, body: str, notes: Iterable[str] = ()) -> None:
    """Print the figures; append them to RESULTS.md unless --quick or --no-append."""
    print(body)
    if args.quick:
        log("--quick: not appended to RESULTS.md")
    elif not args.no_append:
        append_results(title, model, body, notes)
        log(f"appended to {RESULTS}")


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


# -- the scan summary (``cxr-triage scan --summary-json FILE``) --------------------------------------
def read_scan_summary(path: Path) -> dict:
    """The JSON summary a scan wrote, plus ``line`` (one readable line) for logs and tables.

    Keys: files, scored, rejected, failed, skipped, duplicates, queued, elapsed_s, images_per_s.
    """
    summary = json.loads(Path(path).read_text())
    summary["line"] = (
        f"{summary['files']} files: {summary['scored']} scored, {summary['rejected']} rejected, "
        f"{summary['failed']} failed, {summary['skipped']} skipped, {summary['duplicates']} duplicate "
        f"content; {summary['queued']} queued; {summary['elapsed_s']:.1f} s, "
        f"{summary['images_per_s']:.1f} images/s"
    )
    return summary
