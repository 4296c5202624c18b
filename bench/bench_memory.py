"""Memory stability of the scoring process: RSS after 1,000 and after 10,000 scored files.

Runs the real ``cxr-triage scan TREE --no-progress`` (embedded: the scan process holds the model and scores,
its decode pool decodes) over ``--files`` small unique JPEGs into a fresh SQLite database, and polls every
``--interval`` s the RSS of the scan process (the scoring process), of its decode children, and the number of
finished images in the database (read-only SQLite reader, WAL). Growth = RSS at the first sample that sees the final count
of finished files / RSS at the first sample with >= 1,000 finished - 1. Target: < 10 %.

Run: ``flock .work/heavy.lock .venv/bin/python bench/bench_memory.py`` (``--quick`` for development).
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, databases, processes, results  # noqa: E402
from bench import corpus as corpora  # noqa: E402
from bench.results import log  # noqa: E402


def finished_count(db_path: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(
                "SELECT count(*) FROM images WHERE status IN ('scored', 'rejected', 'failed')"
            ).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error:
        return -1


def main(argv: list[str] | None = None) -> None:
    parser = common.make_parser(__doc__)
    parser.add_size("--files", 10_000, 300, "files to score")
    parser.add_size("--first", 1_000, 50, "first checkpoint")
    parser.add_argument("--interval", type=float, default=0.5, help="sampling interval, s")
    args, model_dir, model = parser.parse_with_model(argv)
    # the same cached set of unique small files as the "new files" of bench_backlog.py
    tree, manifest = corpora.build_small_tree("backlog-new", args.files, seed=11, tag="-new")
    if processes.training_running():
        log("WARNING: model training is running: CPU contention, figures will be pessimistic")

    db_path = corpora.WORK / "memory" / "memory.sqlite3"
    url = databases.fresh_sqlite(db_path)
    common.upgrade_schema(url, model_dir)
    summary_file = db_path.with_suffix(".summary.json")
    cmd = common.scan_cli(summary_file, str(tree), "--no-progress", *common.store_args(url))
    log(f"scoring {args.files} files: {' '.join(cmd)}")
    started = time.perf_counter()
    proc = common.start_product(cmd, model_dir)
    poller = processes.RssPoller(
        proc.pid, interval=args.interval, probe=lambda: finished_count(db_path)
    ).start()
    last_report = 0
    while proc.poll() is None:
        time.sleep(1.0)
        if (
            poller.samples
            and poller.samples[-1].extra
            and poller.samples[-1].extra >= last_report + args.files // 10
        ):
            s = poller.samples[-1]
            last_report = s.extra
            log(
                f"  {s.extra} finished, scoring process RSS {processes.mib(s.main)}, tree {processes.mib(s.tree)}"
            )
    stderr = proc.stderr.read()
    wall = time.perf_counter() - started
    poller.stop()
    if proc.returncode != 0:
        sys.stderr.write(stderr[-3000:])
        raise SystemExit(f"scan failed with code {proc.returncode}")
    summary = results.read_scan_summary(summary_file)["line"]
    log(f"  {summary}")

    samples = [s for s in poller.samples if isinstance(s.extra, int) and s.extra >= 0]
    at_first = next((s for s in samples if s.extra >= args.first), None)
    most = max((s.extra for s in samples), default=None)
    # the first sample at the final count: later ones may already be tearing the decode pool down
    at_end = next((s for s in samples if s.extra == most), None)
    if at_first is None or at_end is None:
        raise SystemExit("not enough samples")
    growth = at_end.main / at_first.main - 1.0
    growth_tree = at_end.tree / at_first.tree - 1.0
    peak = max(s.main for s in samples)
    # a coarse curve: RSS of the scoring process at each tenth of the run
    curve = []
    for k in range(1, 11):
        target = args.files * k // 10
        s = next((x for x in samples if x.extra >= target), at_end)
        curve.append(f"{s.extra}: {s.main / 2**20:.0f}")
    body = results.table(
        ["checkpoint", "finished files", "RSS scoring process", "RSS whole tree (with decode pool)"],
        [
            [
                f"first sample >= {args.first:,}",
                at_first.extra,
                processes.mib(at_first.main),
                processes.mib(at_first.tree),
            ],
            [
                "first sample at the final count",
                at_end.extra,
                processes.mib(at_end.main),
                processes.mib(at_end.tree),
            ],
            ["growth (target < 10 %)", "", f"{growth * 100:+.1f} %", f"{growth_tree * 100:+.1f} %"],
            ["peak", "", processes.mib(peak), processes.mib(max(s.tree for s in samples))],
        ],
    )
    body += "\n\nScoring-process RSS (MiB) by finished files: " + ", ".join(curve)
    notes = [
        f"files: {args.files:,} unique small JPEGs (224 px Kermany films + a unique comment segment), "
        "embedded `cxr-triage scan TREE --no-progress --database-url sqlite:///...`",
        f"scan: {summary}; wall {wall:.1f} s",
        f"RSS (psutil) every {args.interval} s; finished count read from the SQLite database at the same time",
    ]
    results.publish(args, "Memory stability of the scoring process (benchmark 6)", model, body, notes)


if __name__ == "__main__":
    main()
