"""Distributed scaling on Redis + PostgreSQL: 1 vs 2 Celery worker processes on this machine (CPU only).

For each configuration (``--configs``, default ``1x2,2x1`` = processes x decode workers per process):
fresh PostgreSQL database and Redis db 13, ``cxr-triage worker --processes P --decode-workers K``
started and warmed up (each worker process loads its model on its first task: a small warm-up scan
with one file per message is run first), then the measured command
``cxr-triage scan CORPUS --broker-url redis://127.0.0.1:6379/13 --database-url postgresql+psycopg://... --wait``
over the same mixed corpus as bench_throughput.py. images/s = files / wall clock of that scan (registration,
hashing, enqueueing and waiting for every file to be final included).

Run: ``flock .work/heavy.lock .venv/bin/python bench/bench_distributed.py`` (``--quick`` for development).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, databases, processes  # noqa: E402
from bench import corpus as corpora  # noqa: E402
from bench import results as report  # noqa: E402
from bench.results import log  # noqa: E402

PG_NAME = "cxr_bench_distributed"


def ping_workers(expected: int, timeout: float = 180.0) -> int:
    from worker.queue.celery_app import app

    app.conf.broker_url = databases.REDIS_URL
    deadline = time.monotonic() + timeout
    replies = []
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        if len(replies) >= expected:
            return len(replies)
        time.sleep(1.0)
    return len(replies)


def warm_tree(count: int, tag: str) -> Path:
    """``count`` small unique JPEGs for the warm-up scan."""
    folder = corpora.WORK / "distributed" / f"warm-{tag}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    sources = [p for p in corpora.source_images(99)[: count * 2] if p.read_bytes()[:2] == b"\xff\xd8"][:count]
    for i, source in enumerate(sources):
        (folder / f"warm{i:03d}.jpg").write_bytes(corpora.tagged_jpeg(source.read_bytes(), f"warm {tag} {i}"))
    return folder


def run_config(processes: int, decode_workers: int, corpus: Path, n: int, model_dir: Path) -> dict:
    env = dict(os.environ, **common.bench_env(model_dir))
    url = databases.create_postgres(PG_NAME)
    databases.flush_redis()
    common.upgrade_schema(url, model_dir)
    log_path = corpora.WORK / "distributed" / f"worker-{processes}x{decode_workers}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = common.cli(
        "worker",
        "--processes",
        str(processes),
        "--decode-workers",
        str(decode_workers),
        *common.store_args(url, broker=True),
    )
    log(f"starting: {' '.join(cmd)}")
    with open(log_path, "w") as worker_log:
        supervisor = subprocess.Popen(cmd, stdout=worker_log, stderr=subprocess.STDOUT, env=env)
    try:
        alive = ping_workers(processes)
        if alive < processes:
            raise SystemExit(f"only {alive}/{processes} workers answered; see {log_path}")
        warm = warm_tree(4 * processes, f"{processes}x{decode_workers}")
        log(f"  {alive} worker(s) up; warm-up scan of {4 * processes} files, one per message ...")
        subprocess.run(
            common.cli(
                "scan",
                str(warm),
                "--no-progress",
                "--wait",
                "--batch-size",
                "1",
                *common.store_args(url, broker=True),
            ),
            check=True,
            capture_output=True,
            env=env,
        )
        log(f"  measured: cxr-triage scan CORPUS --wait ({n} files) ...")
        summary_file = corpora.WORK / "distributed.summary.json"
        timed = processes.run_timed(
            common.scan_cli(
                summary_file,
                str(corpus),
                "--no-progress",
                "--wait",
                *common.store_args(url, broker=True),
            ),
            env=common.bench_env(model_dir),
        )
        timed.exit_if_failed("distributed scan")
    finally:
        processes.terminate(supervisor, timeout=150)
        databases.drop_postgres(PG_NAME)
        databases.flush_redis()
    summary = report.read_scan_summary(summary_file)
    log(f"  {summary['line']} (wall {timed.seconds:.1f} s, {n / timed.seconds:.1f} images/s)")
    return {**summary, "wall": timed.seconds, "rate": n / timed.seconds}


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_size("--files", 1200, 24, "mixed corpus size")
    parser.add_argument(
        "--configs", default="1x2,2x1", help="comma-separated PROCESSESxDECODE_WORKERS (default 1x2,2x1)"
    )
    args, model_dir, model = parser.parse_with_model(argv)
    corpus, manifest = corpora.build_corpus("mixed", args.files)
    if processes.training_running():
        log("WARNING: model training is running: CPU contention, figures will be pessimistic")
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",")]
    results = {c: run_config(c[0], c[1], corpus, args.files, model_dir) for c in configs}

    base = results[configs[0]]["rate"]
    rows = [
        [
            f"`--processes {p} --decode-workers {k}`",
            f"{r['rate']:.1f}",
            f"{r['wall']:.1f}",
            f"{r['rate'] / base:.2f}",
            r["line"],
        ]
        for (p, k), r in results.items()
    ]
    body = report.table(
        ["workers", "images/s", "wall s", f"vs {configs[0][0]}x{configs[0][1]}", "scan summary"], rows
    )
    notes = [
        f"corpus: {corpora.corpus_description(manifest)} (the same as bench_throughput.py)",
        "Redis 127.0.0.1:6379/13, PostgreSQL 127.0.0.1:5432 (fresh database per configuration); "
        "no GPU in this session: every worker scores on the CPU",
        "the scan itself (hashing in its own decode pool, registration, enqueueing, polling) runs on the same "
        "2 cores as the workers",
    ]
    report.publish(args, "Distributed scaling, Redis + PostgreSQL (benchmark 7)", model, body, notes)


if __name__ == "__main__":
    main()
