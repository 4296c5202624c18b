"""Kill recovery with the DEFAULT lease (issue 9): ``python -m bench.chaos.kill_recovery``.

A real ``cxr-triage worker`` (supervisor + one Celery child + decode pool) and ``cxr-triage watch``
on our own Redis and PostgreSQL, with the **default** lease (900 s), while files are dropped in
bursts. The Celery child is SIGKILLed while it holds a claimed batch; for each kill we measure the
seconds from the SIGKILL until every image it held is final. Target: <= 60 s (the supervisor
releases the dead child's leases and re-sends its images at once; lease expiry is the backstop).
Kills one at a time (each batch final before the next kill); ``bench.chaos.run``'s kill-worker
scenario measures the same while kills overlap the backlog. Uses the harness of :mod:`bench.chaos.run` (Redis, proxy, services, feeder, evaluation).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time
from datetime import UTC, datetime

from bench.chaos import run as chaos
from bench.chaos import scenarios, services
from bench.chaos.scenarios import wait_until
from bench.chaos.services import celery_worker_pid

TARGET_S = 60.0
FINAL = ("scored", "rejected", "failed", "superseded")


class KillRecovery(chaos.KillWorker):
    name = "kill-recovery"
    limit_s = 900.0

    def __init__(self, ctx: chaos.Context, files: int, rate: float, kills: int) -> None:
        super().__init__(ctx, files, rate, kills)
        self.kill_to_final: list[float] = []

    def inject(self, feeder, monitor, deadline) -> None:
        from sqlalchemy import create_engine, text

        supervisor = self.services["worker"]
        engine = create_engine(self.monitor_url())

        def rows(query: str, **params) -> list:
            try:
                with engine.connect() as connection:
                    return list(connection.execute(text(query), params))
            except Exception:  # noqa: BLE001 - the monitor retries
                return []

        since = datetime(2000, 1, 1, tzinfo=UTC)
        claimed = "SELECT id FROM images WHERE status = 'processing' AND updated_at > :since"
        finals = ", ".join(f"'{state}'" for state in FINAL)
        query = f"SELECT count(*) FROM images WHERE id = ANY(:ids) AND status NOT IN ({finals})"
        for number in range(1, self.kills + 1):
            limit = min(deadline - 120, time.monotonic() + 180)
            if not wait_until(lambda s=since: len(rows(claimed, since=s)) > 1, limit, poll=0.05):
                self.result.notes.append("no batch in hand to kill; kills stopped")
                break
            pid = celery_worker_pid(supervisor)
            if pid is None:
                break
            in_hand = [row[0] for row in rows(claimed, since=since)]
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            since = datetime.now(UTC)
            self.faults_end.append(killed_at)
            wait_until(lambda ids=in_hand: rows(query, ids=ids) == [(0,)], deadline - 30, poll=0.2)
            seconds = time.monotonic() - killed_at
            self.kill_to_final.append(seconds)
            chaos.log(
                f"kill-recovery: kill {number}: {len(in_hand)} image(s) in hand final {seconds:.1f} s later"
            )
            time.sleep(5.0)
        engine.dispose()
        self.result.faults = len(self.kill_to_final)
        if self.kill_to_final:
            self.result.notes.append(
                "SIGKILL to all-final of the killed batch with the default 900 s lease: "
                + ", ".join(f"{s:.1f}" for s in self.kill_to_final)
                + f" s (max {max(self.kill_to_final):.1f} s; target <= {TARGET_S:.0f} s)"
            )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description="Worker kill recovery with the default lease.")
    parser.add_argument("--files", type=int, default=160, help="files dropped (default 160)")
    parser.add_argument("--kills", type=int, default=3, help="worker kills (default 3)")
    parser.add_argument("--rate", type=float, default=4.0, help="files dropped per second")
    parser.add_argument("--no-results", action="store_true", help="do not append to bench/RESULTS.md")
    args = parser.parse_args()
    # free ports of our own instead of the harness's fixed ones (other runs may share this machine)
    services.REDIS_PORT, services.PROXY_PORT = _free_port(), _free_port()
    scenarios.PROXY_PORT = services.PROXY_PORT  # imported by name there
    chaos.WORK.mkdir(parents=True, exist_ok=True)
    os.chdir(chaos.REPO)
    model = chaos.model_dir()
    redis, proxy = chaos.Redis(), chaos.PgProxy(20.0)
    ctx = chaos.Context(redis, proxy, model, False, args.files)
    started = datetime.now(UTC)
    try:
        redis.start()
        proxy.start()
        scenario = KillRecovery(ctx, args.files, args.rate, args.kills)
        result = scenario.run()
    finally:
        proxy.stop()
        redis.stop()
    body = chaos.table([result])
    extra = chaos.notes([result])
    print(body)
    print(extra)
    times = scenario.kill_to_final
    met = bool(times) and max(times) <= TARGET_S
    if not args.no_results:
        section = (
            f"\n## Kill recovery, default lease ({started.strftime('%Y-%m-%d %H:%M UTC')})\n\n"
            f"`python -m bench.chaos.kill_recovery --files {args.files} --kills {args.kills}` - machine: "
            f"{chaos.machine()}; git {chaos.git_revision()}; lease 900 s (default). Seconds from SIGKILL "
            f"of the Celery worker (holding a claimed batch) to all of that batch final: "
            f"{', '.join(f'{s:.1f}' for s in times) or 'none measured'}; target <= {TARGET_S:.0f} s: "
            f"{'met' if met else 'MISSED'}.\n\n" + body + "\n" + extra
        )
        with open(chaos.REPO / "bench" / "RESULTS.md", "a") as handle:
            handle.write(section)
    return 0 if met and not (result.lost or result.duplicates or result.timed_out) else 1


if __name__ == "__main__":
    sys.exit(main())
