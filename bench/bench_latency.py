"""Drop-to-score latency of ``cxr-triage watch`` (embedded, SQLite) under a steady drip of files.

A drip of 2048x2048 JPEG films at ``--rate`` files/s for ``--seconds`` (default 5/s for 120 s): each file is
written under a temporary name (``*.tmp``, which the watcher ignores), closed, its close time recorded
(UTC), then renamed into place. Latency = ``images.finished_at`` (UTC, committed by the watcher) minus
the close time. One warm-up file is dropped and scored first, so the one-off model load is reported
separately (cold latency) and not mixed into the steady-state percentiles.

Run: ``flock .work/heavy.lock .venv/bin/python bench/bench_latency.py`` (``--quick`` for development).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, databases, processes, results  # noqa: E402
from bench import corpus as corpora  # noqa: E402
from bench.results import log  # noqa: E402


def finished_times(db_path: Path) -> dict[str, tuple[str, datetime | None]]:
    """path -> (status, finished_at in UTC) for every registered file."""
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    except sqlite3.OperationalError:
        return {}
    try:
        rows = conn.execute(
            "SELECT s.path, i.status, i.finished_at FROM source_files s JOIN images i ON i.id = s.image_id"
        ).fetchall()
    except sqlite3.OperationalError:
        return {}
    finally:
        conn.close()
    out = {}
    for path, status, finished in rows:
        moment = None
        if finished:
            moment = datetime.fromisoformat(str(finished))
            if moment.tzinfo is None:  # SQLite keeps naive datetimes; the product stores UTC
                moment = moment.replace(tzinfo=UTC)
        out[path] = (status, moment)
    return out


def drop(folder: Path, name: str, data: bytes) -> float:
    """Write ``data`` under a temporary name, close it, rename into place; return the close time (epoch)."""
    temporary = folder / f"{name}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    closed = time.time()
    os.rename(temporary, folder / name)
    return closed


def wait_for(db_path: Path, paths: list[str], timeout: float, poll: float = 0.25) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        seen = finished_times(db_path)
        if all(p in seen and seen[p][1] is not None for p in paths) or time.monotonic() > deadline:
            return seen
        time.sleep(poll)


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_argument("--rate", type=float, default=5.0, help="files per second (default 5)")
    parser.add_size("--seconds", 120.0, 10.0, "drip duration")
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="attach py-spy (--idle, all processes) to the watcher during the drip; raw stacks to FILE",
    )
    args, model_dir, model = parser.parse_with_model(argv)
    count = int(round(args.rate * args.seconds))
    corpus, manifest = corpora.build_corpus("drip-jpeg", count + 1, mix={"jpeg": 1.0}, seed=3)
    files = sorted(str(p) for p in corpus.rglob("*.jpg"))
    payloads = [Path(f).read_bytes() for f in files]
    warm_payload, payloads = payloads[0], payloads[1:]
    if processes.training_running():
        log("WARNING: model training is running: CPU contention, figures will be pessimistic")

    work = corpora.WORK / "latency"
    folder = work / "drop"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    db_path = work / "watch.sqlite3"
    url = databases.fresh_sqlite(db_path)
    # schema first, so that polling never races the watcher's own migration
    common.upgrade_schema(url, model_dir)

    cmd = common.cli("watch", str(folder), *common.store_args(url))
    log(f"starting: {' '.join(cmd)}")
    proc = common.start_product(cmd, model_dir)
    stderr_lines: list[str] = []
    threading.Thread(target=lambda: stderr_lines.extend(proc.stderr), daemon=True).start()
    poller = processes.RssPoller(proc.pid, interval=1.0).start()
    try:
        deadline = time.monotonic() + 120
        while not any("watching" in line for line in stderr_lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("watcher did not start:\n" + "".join(stderr_lines[-30:]))
            time.sleep(0.1)
        time.sleep(1.0)  # let the observer start and the first reconciliation rescan run

        closed = drop(folder, "warmup.jpg", warm_payload)
        seen = wait_for(db_path, [str(folder / "warmup.jpg")], timeout=180)
        status, finished = seen.get(str(folder / "warmup.jpg"), ("missing", None))
        cold = (finished.timestamp() - closed) if finished else float("nan")
        log(f"warm-up file {status}: cold drop-to-score {cold:.2f} s (model load included)")

        spy = None
        if args.profile:
            from bench.profile_run import py_spy

            spy = subprocess.Popen(
                [
                    py_spy(),
                    "record",
                    "--pid",
                    str(proc.pid),
                    "--subprocesses",
                    "--idle",
                    "--format",
                    "raw",
                    "--rate",
                    "50",
                    "--duration",
                    str(int(args.seconds) + 5),
                    "--output",
                    args.profile,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        log(f"drip: {count} JPEGs at {args.rate:g}/s for {args.seconds:g} s ...")
        close_times: dict[str, float] = {}
        started = time.monotonic()
        behind = 0.0
        for i, payload in enumerate(payloads):
            due = started + i / args.rate
            now = time.monotonic()
            if due > now:
                time.sleep(due - now)
            else:
                behind = max(behind, now - due)
            name = f"drip{i:05d}.jpg"
            close_times[str(folder / name)] = drop(folder, name, payload)
            if (i + 1) % max(count // 8, 1) == 0:
                log(f"  {i + 1}/{count} dropped")
        drip_seconds = time.monotonic() - started
        seen = wait_for(db_path, list(close_times), timeout=120)
        if spy is not None:
            spy.wait(timeout=60)
    finally:
        processes.terminate(proc)
        poller.stop()

    latencies, statuses = [], {}
    for path, closed in close_times.items():
        status, finished = seen.get(path, ("missing", None))
        statuses[status] = statuses.get(status, 0) + 1
        if finished is not None and status == "scored":
            latencies.append(finished.timestamp() - closed)
    p50, p95 = results.percentile(latencies, 50), results.percentile(latencies, 95)
    body = results.table(
        [
            "files dropped",
            "rate achieved",
            "scored",
            "p50 s",
            "p95 s (target <= 2 s)",
            "p99 s",
            "max s",
            "cold first file s",
            "watcher peak RSS (tree)",
        ],
        [
            [
                count,
                f"{(count - 1) / drip_seconds:.2f}/s",
                f"{len(latencies)} ({statuses})",
                f"{p50:.2f}",
                f"{p95:.2f}",
                f"{results.percentile(latencies, 99):.2f}",
                f"{max(latencies, default=float('nan')):.2f}",
                f"{cold:.2f}",
                processes.mib(poller.peak_tree),
            ]
        ],
    )
    notes = [
        f"drip: {count} distinct {manifest['side']}x{manifest['side']} JPEG films (Kermany, upscaled), "
        "written as NAME.tmp, closed, renamed to NAME.jpg; latency = images.finished_at - close time, both UTC",
        "watcher: `cxr-triage watch DROP --database-url sqlite:///... --log-level WARNING`, defaults otherwise "
        "(inotify, --batch-wait 0.5, batch 32, one decode process per core)",
        f"writer fell behind schedule by at most {behind * 1000:.0f} ms",
    ]
    results.publish(args, "Drop-to-score latency in watch mode (benchmark 4)", model, body, notes)


if __name__ == "__main__":
    main()
