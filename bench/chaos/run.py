"""Fault scenarios against real processes: ``python -m bench.chaos.run [--quick] [--files N]``.

Each scenario runs real ``cxr-triage worker`` (supervisor + Celery child + decode pool) and
``cxr-triage watch`` processes against a Redis of our own (port 6391, append-only, restartable)
and PostgreSQL through ``bench.chaos.proxy`` (127.0.0.1:65432 -> 5432, outage on SIGUSR1),
while a feeder thread keeps dropping real Kermany JPEGs (copied and renamed) into a drop folder:

1. ``kill-worker``   the Celery worker process is SIGKILLed mid-batch, repeatedly (up to 10 kills,
                     each once the previous kill's batch is final);
2. ``redis-restart`` Redis is SIGKILLed and restarted from its append-only file mid-run;
3. ``pg-outage``     PostgreSQL unreachable for 20 s (all connections cut, new ones refused);
4. ``watcher``       the watcher is SIGKILLed and restarted, and the drop folder is renamed away
                     and back while files keep arriving;
5. ``delete-replace``files deleted or replaced between their event and their processing;
6. ``disk-full``     embedded mode (``watch`` without a broker, SQLite) with the database on a
                     small tmpfs that is filled, then freed.

Every setting is the product default (lease 900 s, rescan 300 s, stable 2 s) except
``CXR_TRIAGE_DECODE_WORKERS=1``, as an operator would set it on a 2-core machine. For every SIGKILL
(worker, Redis, watcher) the run reports the time from the kill until the work it interrupted is final
and fails when that exceeds 60 s (issue 9), or when anything is lost or scored twice.

Processes that exit on their own are restarted after 5 s, as systemd does with the shipped units
(``Restart=always``, ``RestartSec=5``); every such exit is counted in the table.

Per scenario: files in, final states, duplicates (an image with more than one score, a path
registered twice), losses (a file on disk whose current content has no final row), and the time
to recover: from the end of the fault until every file dropped before that moment is final.
Every scenario has a hard time limit. Generated files live under .work/chaos/ (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime

from bench.chaos.observe import Result, notes, table
from bench.chaos.scenarios import (
    Context,
    DeleteReplace,
    DiskFull,
    KillWorker,
    PgOutage,
    RedisRestart,
    WatcherRestart,
)
from bench.chaos.services import (
    KILL_TARGET_S,
    REPO,
    RESTART_DELAY_S,
    WORK,
    PgProxy,
    Redis,
    log,
    model_dir,
    model_version,
)
from bench.results import git_revision, machine

SCENARIOS = ("kill-worker", "redis-restart", "pg-outage", "watcher", "delete-replace", "disk-full")


def main() -> int:
    parser = argparse.ArgumentParser(description="Fault scenarios against real worker/watch processes.")
    parser.add_argument("--quick", action="store_true", help="small runs (development)")
    parser.add_argument("--files", type=int, default=None, help="files for kill-worker (default 1000)")
    parser.add_argument("--kills", type=int, default=None, help="worker kills (default 10)")
    parser.add_argument("--other-files", type=int, default=None, help="files for the other scenarios")
    parser.add_argument("--rate", type=float, default=4.0, help="files dropped per second")
    parser.add_argument("--only", action="append", choices=SCENARIOS, help="run only these scenarios")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    files = args.files or (120 if args.quick else 1000)
    kills = args.kills or (3 if args.quick else 10)
    other = args.other_files or (40 if args.quick else 240)
    chosen = args.only or list(SCENARIOS)
    WORK.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    model = model_dir()
    redis, proxy = Redis(), PgProxy(20.0)
    ctx = Context(redis, proxy, model, args.quick, files)
    results: list[Result] = []
    started = datetime.now(UTC)
    revision = git_revision()  # the code the run started on
    load_start = os.getloadavg()  # the machine may be shared: the 1/5/15-min load goes with the figures
    try:
        redis.start()
        proxy.start()
        builders = {
            "kill-worker": lambda: KillWorker(ctx, files, args.rate, kills),
            "redis-restart": lambda: RedisRestart(ctx, other, args.rate),
            "pg-outage": lambda: PgOutage(ctx, other, args.rate),
            "watcher": lambda: WatcherRestart(ctx, other, args.rate),
            "delete-replace": lambda: DeleteReplace(ctx, other, args.rate),
            "disk-full": lambda: DiskFull(ctx, other, args.rate),
        }
        for name in chosen:
            log(f"=== {name} ===")
            result = builders[name]().run()
            results.append(result)
            log(
                f"{name}: lost {result.lost}, duplicates {result.duplicates}, states {dict(result.states)}, "
                f"recover {result.recover_text()} s, kill -> all final {result.kill_text()} s, "
                f"{result.elapsed_s:.0f} s"
            )
    finally:
        proxy.stop()
        redis.stop()
    load_text = " / ".join(", ".join(f"{x:.1f}" for x in load) for load in (load_start, os.getloadavg()))
    failures = [f"{r.name}: {', '.join(why)}" for r in results if (why := r.failures(KILL_TARGET_S))]
    body = table(results)
    extra = notes(results)
    print(body)
    print(extra)
    summary = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "revision": revision,
        "model": f"{model_version(model)} ({model})",
        "load_average": load_text,
        "failures": failures,
        "results": [r.__dict__ | {"states": dict(r.states)} for r in results],
    }
    (WORK / "last-run.json").write_text(json.dumps(summary, indent=2, default=str))
    if not args.no_results:
        section = (
            f"\n## Chaos scenarios ({summary['date']}{', quick' if args.quick else ''})\n\n"
            f"`python -m bench.chaos.run{' --quick' if args.quick else ''}`"
            f"{'' if args.files is None else f' --files {args.files}'}"
            f"{'' if args.other_files is None else f' --other-files {args.other_files}'} - "
            f"machine: {summary['machine']}; git {summary['revision']}; model {summary['model']}. "
            f"Real `cxr-triage worker` (1 Celery process, 1 decode process) and `cxr-triage watch` on our "
            f"own Redis and PostgreSQL 15 through a TCP proxy; product defaults (lease 900 s, rescan 300 s, "
            f"stable 2 s; only the decode processes set); load average {load_text} (start / end); files dropped at {args.rate:g}/s; exits restarted after {RESTART_DELAY_S:.0f} s as systemd "
            "does. *lost* = a file on disk at the end without a final row for its current content; "
            "*duplicates* = images with more than one score plus paths registered twice; *recover* = "
            "from the end of a fault until every file dropped before it is final; *kill -> all final* = from "
            "each SIGKILL until the work it interrupted is final (kill-worker: the batch the killed worker "
            f"held; redis-restart, watcher: every file dropped before the kill), target <= {KILL_TARGET_S:.0f} s; "
            "*drain* = from the "
            "last drop until everything is final; *rework* = claims beyond the first.\n\n"
            + body
            + "\n"
            + extra
            + (
                "\n**Passed**: nothing lost or duplicated, every kill's work final within "
                f"{KILL_TARGET_S:.0f} s.\n"
                if not failures
                else "\n**Failed**: " + "; ".join(failures) + ".\n"
            )
        )
        with open(REPO / "bench" / "RESULTS.md", "a") as handle:
            handle.write(section)
    for failure in failures:
        log(f"FAILED {failure}")
    log("PASSED" if not failures else f"{len(failures)} scenario(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
