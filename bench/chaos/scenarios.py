"""The six fault scenarios, each on a fresh database, drop folder, worker and watcher."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench.chaos.feed import Feeder
from bench.chaos.observe import Kill, Monitor, Readiness, Result, evaluate, wait_all_final
from bench.chaos.services import (
    CLI,
    KILL_TARGET_S,
    PG_ADMIN,
    PG_PORT,
    PROXY_PORT,
    WORK,
    PgProxy,
    Redis,
    Service,
    celery_worker_pid,
    log,
    pg_url,
    short_cmd,
)
from bench.corpus import distinct_films as source_files
from bench.databases import create_postgres, drop_postgres
from bench.processes import alive, children, cmdline, group_members, rss_bytes, wait_port


@dataclass
class Context:
    redis: Redis
    proxy: PgProxy
    model: Path
    quick: bool
    files: int


class Scenario:
    """Common set-up: a database, a drop folder, worker + watcher, feeder, monitor, evaluation."""

    name = "base"
    limit_s = 240.0
    embedded = False

    def __init__(self, ctx: Context, files: int, rate: float) -> None:
        self.ctx, self.files, self.rate = ctx, files, rate
        self.metrics_port: int | None = None
        self.dir = WORK / self.name
        self.drop = self.dir / "drop"
        self.db_name = f"cxr_chaos_{self.name.replace('-', '_')}"
        self.result = Result(self.name)
        self.faults_end: list[float] = []
        self.sigkills: list[Kill] = []  # each SIGKILL and the work it interrupted
        self.services: dict[str, Service] = {}

    # -- set-up ----------------------------------------------------------------------------------
    def database_url(self) -> str:
        return pg_url(self.db_name, PROXY_PORT)

    def monitor_url(self) -> str:
        return pg_url(self.db_name, PG_PORT)

    def env(self) -> dict[str, str]:
        environ = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
        environ.update(
            CXR_TRIAGE_DATABASE_URL=self.database_url(),
            CXR_TRIAGE_BROKER_URL="" if self.embedded else self.ctx.redis.url,
            CXR_TRIAGE_MODEL_DIR=str(self.ctx.model),
            # product defaults (lease 900 s, rescan 300 s, stable 2 s); only the decode processes are
            # set, as an operator would on a 2-core machine that also runs the watcher
            CXR_TRIAGE_DECODE_WORKERS="1",
            PYTHONUNBUFFERED="1",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        return environ

    def prepare(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.drop.mkdir(parents=True)
        if not self.embedded:
            create_postgres(self.db_name, PG_ADMIN)
            self.ctx.redis.flush()
        done = subprocess.run(
            [CLI, "db", "upgrade"], env=self.env(), capture_output=True, text=True, timeout=120
        )
        if done.returncode != 0:
            raise RuntimeError(f"db upgrade failed: {done.stderr[-500:]}")

    def start_services(self) -> None:
        if not self.embedded:
            self.metrics_port = free_port()
            args = ["worker", "--processes", "1", "--cpu", "--metrics-port", str(self.metrics_port)]
            self.services["worker"] = Service("worker", args, self.env(), self.dir / "worker.log")
        self.services["watcher"] = Service(
            "watcher", ["watch", str(self.drop)], self.env(), self.dir / "watch.log"
        )
        for service in self.services.values():
            service.start()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the worker's Celery child is up and the watcher has started observing."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            watch_ok = "watching" in (self.dir / "watch.log").read_text(errors="replace")
            worker_ok = self.embedded or "ready" in (self.dir / "worker.log").read_text(errors="replace")
            if watch_ok and worker_ok:
                time.sleep(1.0)
                return
            time.sleep(0.5)
        raise RuntimeError(f"{self.name}: services did not become ready in {timeout:.0f} s")

    # -- the run ---------------------------------------------------------------------------------
    def inject(self, feeder: Feeder, monitor: Monitor, deadline: float) -> None:
        """The fault; subclasses override. Appends the moment each fault ended to faults_end."""

    def run(self) -> Result:
        started = time.monotonic()
        deadline = started + self.limit_s
        monitor = None
        feeder = None
        try:
            self.prepare()
            self.start_services()
            self.wait_ready()
            sources = source_files(self.files, offset=self.source_offset())
            feeder = self.make_feeder(sources)
            monitor = Monitor(self.monitor_url())
            monitor.start()
            feeder.start()
            self.inject(feeder, monitor, deadline)
            if not wait_all_final(self.monitor_url(), self.drop, feeder, deadline, monitor):
                self.result.timed_out = True
                self.result.notes.append(f"hard limit of {self.limit_s:.0f} s reached")
            time.sleep(1.0)
        except Exception as exc:  # noqa: BLE001 - report the scenario as broken, go on with the next
            self.result.notes.append(f"harness error: {type(exc).__name__}: {exc}")
            traceback.print_exc()
        finally:
            if feeder is not None:
                feeder.stop_event.set()
            self.before_stop()
            for service in self.services.values():
                service.stop()
            if monitor is not None:
                monitor.stop_event.set()
                monitor.join(timeout=10)
        self.after_stop()
        if feeder is not None and monitor is not None:
            try:
                evaluate(
                    self.result,
                    self.monitor_url(),
                    self.drop,
                    feeder,
                    monitor,
                    self.faults_end,
                    self.sigkills,
                )
            except Exception as exc:  # noqa: BLE001
                self.result.notes.append(f"evaluation error: {type(exc).__name__}: {exc}")
        self.result.exits = {name: len(s.exits) for name, s in self.services.items() if s.exits}
        self.result.elapsed_s = time.monotonic() - started
        self.cleanup()
        return self.result

    def source_offset(self) -> int:
        return 0

    def make_feeder(self, sources: list[Path]) -> Feeder:
        return Feeder(self.drop, sources, self.rate, self.name)

    def before_stop(self) -> None:
        pass

    def after_stop(self) -> None:
        pass

    def cleanup(self) -> None:
        if not self.embedded:
            with contextlib.suppress(Exception):
                drop_postgres(self.db_name, PG_ADMIN)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate, deadline: float, poll: float = 0.1) -> bool:
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def processing_now(url: str, since: datetime | None = None) -> int:
    """Images claimed (status processing), optionally only those claimed after ``since``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    query = "SELECT count(*) FROM images WHERE status = 'processing'"
    params = {}
    if since is not None:
        query += " AND updated_at > :since"
        params["since"] = since
    try:
        with engine.connect() as connection:
            return connection.execute(text(query), params).scalar_one()
    except Exception:  # noqa: BLE001
        return 0
    finally:
        engine.dispose()


class KillWorker(Scenario):
    name = "kill-worker"
    limit_s = 720.0

    def __init__(self, ctx: Context, files: int, rate: float, kills: int) -> None:
        super().__init__(ctx, files, rate)
        self.kills = kills
        self.rng = random.Random(1122)
        self.last_kill_wall: datetime | None = None

    def make_feeder(self, sources):
        # bursts of 32 files: the watcher hands on full batches, which take the worker long enough
        # (decode + model) that a kill can land while the batch is claimed but not yet stored
        return Feeder(self.drop, sources, self.rate, self.name, burst=32)

    def inject(self, feeder, monitor, deadline) -> None:
        from sqlalchemy import create_engine, text

        supervisor = self.services["worker"]
        spacing = self.files / self.rate / (self.kills + 1)
        next_kill = time.monotonic() + spacing * 0.6
        engine = create_engine(self.monitor_url())
        query = text(
            "SELECT s.path FROM images i JOIN source_files s ON s.image_id = i.id "
            "WHERE i.status = 'processing' AND i.updated_at > :since"
        )

        def claimed_paths(since: datetime) -> list[str]:
            try:
                with engine.connect() as connection:
                    return list(connection.execute(query, {"since": since}).scalars())
            except Exception:  # noqa: BLE001
                return []

        def claimed_since(since: datetime) -> int:
            return len(claimed_paths(since))

        done = mid_batch = orphans = 0
        since = datetime(2000, 1, 1, tzinfo=UTC)
        while done < self.kills and time.monotonic() < deadline - 60:
            time.sleep(max(0.0, next_kill - time.monotonic()))
            # mid-batch: a batch claimed by the current worker process (not the killed one's leftovers)
            limit = min(deadline - 60, time.monotonic() + (30 if feeder.done.is_set() else 120))
            # a batch of several fresh files (single-file retries of a killed batch finish in ~0.1 s)
            if not wait_until(lambda since=since: claimed_since(since) > 1, limit, poll=0.05):
                self.result.notes.append("no new batch to kill (the feed had ended); kills stopped")
                break
            time.sleep(self.rng.uniform(0.0, 0.3))  # claim, model load, decode or store
            pid = celery_worker_pid(supervisor)
            if pid is None:
                self.result.notes.append(f"kill {done + 1}: no Celery worker process to kill")
                break
            in_hand_paths = claimed_paths(since)
            in_hand = len(in_hand_paths)
            pool_children = children(pid)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            self.sigkills.append((killed_at, in_hand_paths))
            since = datetime.now(UTC)
            done += 1
            mid_batch += in_hand > 0
            self.faults_end.append(killed_at)
            log(
                f"kill-worker: SIGKILL {done}/{self.kills} to Celery pid {pid} with {in_hand} claimed "
                f"image(s) in hand ({len(pool_children)} child processes)"
            )
            time.sleep(3.0)
            orphans += sum(1 for child in pool_children if alive(child) and cmdline(child))
            # each kill's own recovery: the next kill waits until this one's batch is final (or well past
            # the target), or it would land on the retry and chain the kills' times together
            wait_until(
                lambda paths=in_hand_paths: all(p in monitor.final_at for p in paths),
                min(deadline - 60, killed_at + 2 * KILL_TARGET_S),
                poll=0.2,
            )
            next_kill = max(killed_at + spacing, time.monotonic())
        engine.dispose()
        self.result.faults = done
        self.result.notes.append(f"{mid_batch} of {done} kills hit the worker with a claimed batch in hand")
        if orphans:
            self.result.notes.append(
                f"{orphans} child process(es) of killed workers still alive 3 s after the kill"
            )

    def before_stop(self) -> None:
        """Processes of killed workers that outlived them: in the supervisor's group, not its descendants."""
        supervisor = self.services.get("worker")
        pid = supervisor.pid() if supervisor else None
        if pid is None:
            return
        legit = {pid, *children(pid)}
        stray = [p for p in group_members(pid) if p not in legit]
        if stray:
            rss_kb = sum(rss_bytes(p) for p in stray) // 1024
            self.result.notes.append(
                f"at the end, {len(stray)} orphaned process(es) of killed workers still running "
                f"({rss_kb / 1024:.0f} MB RSS in all): {', '.join(sorted({short_cmd(p) for p in stray}))}"
            )


class RedisRestart(Scenario):
    name = "redis-restart"

    def inject(self, feeder, monitor, deadline) -> None:
        time.sleep(self.files / self.rate * 0.35)
        log("redis-restart: SIGKILL redis-server")
        readiness = Readiness(self.metrics_port)
        readiness.start()
        self.ctx.redis.kill()
        self.sigkills.append((time.monotonic(), None))
        time.sleep(5.0)
        self.ctx.redis.start()
        self.faults_end.append(time.monotonic())
        time.sleep(10.0)
        self.result.notes.append(readiness.note("Redis", self.faults_end[-1]))
        self.result.faults = 1
        log("redis-restart: redis-server restarted from its append-only file")


class PgOutage(Scenario):
    name = "pg-outage"

    def inject(self, feeder, monitor, deadline) -> None:
        time.sleep(self.files / self.rate * 0.3)
        log(f"pg-outage: PostgreSQL unreachable for {self.ctx.proxy.outage_seconds:.0f} s")
        readiness = Readiness(self.metrics_port)
        readiness.start()
        self.ctx.proxy.outage()
        time.sleep(self.ctx.proxy.outage_seconds)
        wait_until(lambda: wait_port(PROXY_PORT, 0.2), time.monotonic() + 10)
        self.faults_end.append(time.monotonic())
        time.sleep(10.0)
        self.result.notes.append(readiness.note("PostgreSQL", self.faults_end[-1]))
        self.result.faults = 1


class WatcherRestart(Scenario):
    name = "watcher"

    def make_feeder(self, sources):
        return Feeder(self.drop, sources, self.rate, self.name, away=self.dir / "drop.away")

    def inject(self, feeder, monitor, deadline) -> None:
        duration = self.files / self.rate
        time.sleep(duration * 0.2)
        log("watcher: SIGKILL the watcher (restarted after 5 s)")
        watcher = self.services["watcher"]
        starts = self._starts()
        watcher.kill(signal.SIGKILL)
        self.sigkills.append((time.monotonic(), None))
        wait_until(
            lambda: self._starts() >= starts + 2, time.monotonic() + 120, poll=0.2
        )  # printed, then observing
        self.faults_end.append(time.monotonic())
        time.sleep(duration * 0.3)
        log("watcher: drop folder renamed away for 5 s (files keep arriving in it)")
        away = self.dir / "drop.away"
        os.rename(self.drop, away)
        time.sleep(5.0)
        try:
            os.rename(away, self.drop)
        except OSError:  # someone recreated the folder meanwhile: move the files back by hand
            self.result.notes.append("drop folder was recreated while renamed away; files moved back")
            for entry in away.iterdir():
                os.rename(entry, self.drop / entry.name)
            away.rmdir()
        self.faults_end.append(time.monotonic())
        self.result.faults = 2

    def _starts(self) -> int:
        return (self.dir / "watch.log").read_text(errors="replace").count("watching ")


class DeleteReplace(Scenario):
    name = "delete-replace"

    def make_feeder(self, sources):
        feeder = Feeder(self.drop, sources, self.rate, self.name)
        spares = source_files(self.files // 5 + 5, offset=3000)
        rng = random.Random(20261122)
        self.deleted = 0
        self.replaced = 0
        counter = {"n": 0}

        def sabotage(path: Path) -> None:
            n = counter["n"]
            counter["n"] += 1
            delay = rng.uniform(0.0, 1.5)
            if n % 10 == 3:
                threading.Timer(delay, self._delete, args=(path,)).start()
            elif n % 10 == 7:
                spare = spares[(n // 10) % len(spares)]
                threading.Timer(delay, self._replace, args=(path, spare, n % 20 == 7)).start()

        feeder.on_drop = sabotage
        return feeder

    def _delete(self, path: Path) -> None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            self.deleted += 1

    def _replace(self, path: Path, spare: Path, in_place: bool) -> None:
        try:
            if in_place:
                shutil.copyfile(spare, path)  # same inode, new content
            else:
                shutil.copyfile(spare, path.with_name(path.name + ".tmp"))
                os.replace(path.with_name(path.name + ".tmp"), path)
            self.replaced += 1
        except FileNotFoundError:
            pass

    def inject(self, feeder, monitor, deadline) -> None:
        feeder.done.wait(timeout=max(0.0, deadline - time.monotonic()))
        time.sleep(2.0)
        self.result.faults = self.deleted + self.replaced
        self.result.notes.append(f"{self.deleted} deleted, {self.replaced} replaced after their drop")


class DiskFull(Scenario):
    """Embedded mode (no broker): ``watch`` scores in-process into SQLite on a small tmpfs."""

    name = "disk-full"
    embedded = True
    fs_size = "8m"

    def __init__(self, ctx, files, rate) -> None:
        super().__init__(ctx, files, rate)
        self.mount = self.dir / "dbfs"

    def database_url(self) -> str:
        return f"sqlite:///{self.mount / 'worklist.sqlite3'}"

    def monitor_url(self) -> str:
        return self.database_url()

    def prepare(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.mount.mkdir(parents=True)
        self.drop.mkdir(parents=True)
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.fs_size}", "tmpfs", str(self.mount)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
        self.mounted = True
        super().prepare()

    def start_services(self) -> None:
        self.services["watcher"] = Service(
            "watcher", ["watch", str(self.drop), "--batch-size", "8"], self.env(), self.dir / "watch.log"
        )
        self.services["watcher"].start()

    def inject(self, feeder, monitor, deadline) -> None:
        time.sleep(self.files / self.rate * 0.3)
        filler = self.mount / "filler.bin"
        written = 0
        # unbuffered: a buffered file still holds the bytes that did not fit when ENOSPC is raised,
        # and close() then raises ENOSPC again outside this handler (a harness error, seen once)
        with open(filler, "wb", buffering=0) as handle:
            try:
                while True:
                    written += handle.write(b"\0" * 65536) or 0
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
        log(f"disk-full: database filesystem full ({written // 1024} KiB filler); freeing in 20 s")
        time.sleep(20.0)
        filler.unlink()
        self.faults_end.append(time.monotonic())
        self.result.faults = 1
        log("disk-full: space freed")

    def after_stop(self) -> None:
        import sqlite3

        database = self.mount / "worklist.sqlite3"
        try:
            with contextlib.closing(sqlite3.connect(database)) as connection:
                check = connection.execute("PRAGMA integrity_check").fetchone()[0]
            self.result.notes.append(f"SQLite integrity_check: {check}")
        except sqlite3.Error as exc:
            self.result.notes.append(f"SQLite integrity_check failed to run: {exc}")
        text = " ".join((self.dir / "watch.log").read_text(errors="replace").split())  # undo wrapping
        full = text.count("database or disk is full") + text.count("No space left")
        self.result.notes.append(f"'disk is full' reported {full} time(s) in the watcher log")

    def cleanup(self) -> None:
        # keep a copy of the database for inspection, then unmount
        with contextlib.suppress(OSError):
            shutil.copyfile(self.mount / "worklist.sqlite3", self.dir / "worklist.sqlite3")
        subprocess.run(["umount", str(self.mount)], capture_output=True)
