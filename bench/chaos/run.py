"""Fault scenarios against real processes: ``python -m bench.chaos.run [--quick] [--files N]``.

Each scenario runs real ``cxr-triage worker`` (supervisor + Celery child + decode pool) and
``cxr-triage watch`` processes against a Redis of our own (port 6391, append-only, restartable)
and PostgreSQL through ``bench.chaos.proxy`` (127.0.0.1:65432 -> 5432, outage on SIGUSR1),
while a feeder thread keeps dropping real Kermany JPEGs (copied and renamed) into a drop folder:

1. ``kill-worker``   the Celery worker process is SIGKILLed mid-batch, repeatedly (10 kills);
2. ``redis-restart`` Redis is SIGKILLed and restarted from its append-only file mid-run;
3. ``pg-outage``     PostgreSQL unreachable for 20 s (all connections cut, new ones refused);
4. ``watcher``       the watcher is SIGKILLed and restarted, and the drop folder is renamed away
                     and back while files keep arriving;
5. ``delete-replace``files deleted or replaced between their event and their processing;
6. ``disk-full``     embedded mode (``watch`` without a broker, SQLite) with the database on a
                     small tmpfs that is filled, then freed.

Processes that exit on their own are restarted after 5 s, as systemd does with the shipped units
(``Restart=always``, ``RestartSec=5``); every such exit is counted in the table.

Per scenario: files in, final states, duplicates (an image with more than one score, a path
registered twice), losses (a file on disk whose current content has no final row), and the time
to recover: from the end of the fault until every file dropped before that moment is final.
Every scenario has a hard time limit. Generated files live under .work/chaos/ (gitignored).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".work" / "chaos"
CLI = str(Path(sys.executable).parent / "cxr-triage")
KERMANY = (
    Path(os.environ.get("CXR_TRIAGE_SHARED", REPO.parent / "shared")) / "data" / "kermany-cxr224" / "train"
)
PG_ADMIN = os.environ.get("CXR_CHAOS_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_PORT = 5432
PROXY_PORT = 65432
REDIS_PORT = 6391
LEASE_SECONDS = 20
RESTART_DELAY_S = 5.0
FINAL = ("scored", "rejected", "failed")


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} chaos: {message}\n")
    sys.stderr.flush()


# ----------------------------------------------------------------------------------------------
# infrastructure: our Redis, the PostgreSQL proxy, databases, the model
# ----------------------------------------------------------------------------------------------
def wait_port(port: int, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


class Redis:
    """Our own redis-server on REDIS_PORT with append-only persistence; restartable."""

    def __init__(self) -> None:
        self.dir = WORK / "redis"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(REDIS_PORT),
                "--bind",
                "127.0.0.1",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--save",
                "",
                "--dir",
                str(self.dir),
                "--logfile",
                str(self.dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        if not wait_port(REDIS_PORT):
            raise RuntimeError(f"our redis-server did not start on port {REDIS_PORT}")

    def kill(self) -> None:
        """SIGKILL: no shutdown save, the append-only file is all that survives."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def flush(self) -> None:
        subprocess.run(["redis-cli", "-p", str(REDIS_PORT), "FLUSHALL"], capture_output=True, timeout=10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{REDIS_PORT}/0"


class PgProxy:
    def __init__(self, outage_seconds: float = 20.0) -> None:
        self.outage_seconds = outage_seconds
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        handle = open(WORK / "proxy.log", "ab")  # noqa: SIM115 - lives as long as the proxy
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.chaos.proxy",
                "--listen",
                str(PROXY_PORT),
                "--target",
                str(PG_PORT),
                "--outage-seconds",
                str(self.outage_seconds),
            ],
            cwd=REPO,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not wait_port(PROXY_PORT):
            raise RuntimeError("the PostgreSQL proxy did not start")

    def outage(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGUSR1)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def create_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()


def drop_database(name: str) -> None:
    from sqlalchemy import create_engine, text

    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def pg_url(name: str, port: int) -> str:
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{name}"


def model_dir() -> Path:
    """The shipped model if it is there, else a small untrained one built once (say so)."""
    from models import default_model_dir

    explicit = os.environ.get("CXR_TRIAGE_MODEL_DIR")
    if explicit:
        return Path(explicit)
    shipped = default_model_dir()
    if (shipped / "metadata.json").is_file():
        return shipped
    fallback = WORK / "model"
    if not (fallback / "metadata.json").is_file():
        log("models/shipped is empty: building an untrained baseline model for the runs")
        fallback.mkdir(parents=True, exist_ok=True)
        code = (
            "import json,sys; from models.architectures import build; m=build('baseline',128); "
            f"m.save({str(fallback / 'model.keras')!r}); json.dump(dict(version='chaos-untrained-baseline',"
            "input_size=128,temperature=1.0,screening_threshold=0.5,high_confidence_threshold=0.9,"
            f"model_file='model.keras'), open({str(fallback / 'metadata.json')!r},'w'))"
        )
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
    return fallback


def model_version(directory: Path) -> str:
    return json.loads((directory / "metadata.json").read_text()).get("version", "?")


# ----------------------------------------------------------------------------------------------
# processes, restarted as systemd would
# ----------------------------------------------------------------------------------------------
class Service:
    """A cxr-triage process in its own session; restarted RESTART_DELAY_S after any exit."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logfile: Path) -> None:
        self.name, self.args, self.env, self.logfile = name, args, env, logfile
        self.process: subprocess.Popen | None = None
        self.exits: list[int] = []  # exit codes of exits nobody asked for
        self.intended = 0  # kills done by the scenario itself
        self.stopping = False
        self._expect_exit = False
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        handle = open(self.logfile, "ab")  # noqa: SIM115 - one per process life
        self.process = subprocess.Popen(
            [CLI, *self.args], env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()

    def _watch(self) -> None:
        while not self.stopping:
            time.sleep(0.2)
            process = self.process
            if process is None or process.poll() is None:
                continue
            if self._expect_exit:
                self._expect_exit = False
            else:
                self.exits.append(process.returncode)
                log(
                    f"{self.name} exited with code {process.returncode}; "
                    f"restarting in {RESTART_DELAY_S:.0f} s"
                )
            self._kill_group(process.pid, signal.SIGKILL)  # leftovers of the dead process group
            time.sleep(RESTART_DELAY_S)
            if not self.stopping:
                self._spawn()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """A fault injected on purpose: the whole process (group) dies; restarted like any exit."""
        if self.process and self.process.poll() is None:
            self.intended += 1
            self._expect_exit = True
            self._kill_group(self.process.pid, sig)

    @staticmethod
    def _kill_group(pgid: int, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    def pid(self) -> int | None:
        return self.process.pid if self.process and self.process.poll() is None else None

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping = True
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            self._kill_group(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout)
        self._kill_group(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found.extend(int(c) for c in handle.read().split())
    except OSError:
        return []
    for child in list(found):
        found.extend(descendants(child))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def celery_worker_pid(supervisor: Service) -> int | None:
    pid = supervisor.pid()
    if pid is None:
        return None
    for child in descendants(pid):
        line = cmdline(child)
        if "celery" in line and "worker.celery_app" in line:
            return child
    return None


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _short_cmd(pid: int) -> str:
    line = cmdline(pid)
    if "multiprocessing" in line and "resource_tracker" in line:
        return "multiprocessing resource tracker"
    if "multiprocessing" in line:
        return "multiprocessing spawn child (decode pool)"
    return line[:60]


def group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    members.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return members


# ----------------------------------------------------------------------------------------------
# files: sources, the feeder, and what is on disk at the end
# ----------------------------------------------------------------------------------------------
def sha256_of(path: Path | str) -> str | None:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def source_files(count: int, offset: int = 0) -> list[Path]:
    """``count`` Kermany JPEGs with distinct content, NORMAL and PNEUMONIA interleaved."""
    normal = sorted((KERMANY / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((KERMANY / "PNEUMONIA").glob("*.jpeg"))
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


class Feeder(threading.Thread):
    """Drops ``sources`` into ``drop`` at ``rate`` files/s as ``<tag>_<n>.jpeg``.

    One file in five is written under a ``.part`` name and renamed into place, the rest are copied
    straight in. While the folder is renamed away (``away`` exists instead), files go there.
    """

    def __init__(
        self, drop: Path, sources: list[Path], rate: float, tag: str, away: Path | None = None, burst: int = 1
    ):
        super().__init__(daemon=True)
        self.drop, self.sources, self.rate, self.tag, self.away = drop, sources, rate, tag, away
        self.burst = burst  # files dropped back to back; bursts keep the average rate
        self.dropped: dict[str, float] = {}  # final path (under drop) -> time it was dropped
        self.done = threading.Event()
        self.stop_event = threading.Event()
        self.on_drop = None  # callback(path) for saboteurs

    def run(self) -> None:
        started = time.monotonic()
        for index, source in enumerate(self.sources):
            if self.stop_event.is_set():
                break
            due = started + (index // self.burst) * self.burst / self.rate
            time.sleep(max(0.0, due - time.monotonic()))
            name = f"{self.tag}_{index:05d}.jpeg"
            for _ in range(200):
                folder = (
                    self.drop
                    if self.drop.is_dir()
                    else (self.away if self.away and self.away.is_dir() else None)
                )
                if folder is None:
                    time.sleep(0.05)
                    continue
                try:
                    if index % 5 == 4:
                        shutil.copyfile(source, folder / (name + ".part"))
                        os.rename(folder / (name + ".part"), folder / name)
                    else:
                        shutil.copyfile(source, folder / name)
                    break
                except FileNotFoundError:
                    time.sleep(0.05)  # folder renamed under our feet: write again where it is now
            self.dropped[str(self.drop / name)] = time.monotonic()
            if self.on_drop:
                self.on_drop(self.drop / name)
        self.done.set()


def files_on_disk(drop: Path) -> dict[str, str]:
    from worker.scanner import is_temporary

    found = {}
    for path in drop.rglob("*"):
        if path.is_file() and not path.is_symlink() and not is_temporary(path.name):
            digest = sha256_of(path)
            if digest is not None:
                found[str(path)] = digest
    return found


# ----------------------------------------------------------------------------------------------
# watching the database
# ----------------------------------------------------------------------------------------------
class Monitor(threading.Thread):
    """Polls the database (directly, never through the proxy) and records when each path is final."""

    def __init__(self, url: str, period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.url, self.period = url, period
        self.final_at: dict[str, float] = {}
        self.timeline: list[tuple[float, int, int]] = []  # (t, final images, all images)
        self.stop_event = threading.Event()
        self.errors = 0

    def run(self) -> None:
        from sqlalchemy import create_engine, text

        engine = None
        while not self.stop_event.is_set():
            try:
                if engine is None:
                    engine = create_engine(self.url, connect_args=self._connect_args())
                with engine.connect() as connection:
                    rows = connection.execute(
                        text(
                            "SELECT s.path FROM source_files s JOIN images i ON i.id = s.image_id "
                            "WHERE i.status IN ('scored', 'rejected', 'failed')"
                        )
                    ).all()
                    counts = dict(
                        connection.execute(text("SELECT status, count(*) FROM images GROUP BY status")).all()
                    )
                now = time.monotonic()
                for (path,) in rows:
                    self.final_at.setdefault(path, now)
                final = sum(n for status, n in counts.items() if status in FINAL)
                self.timeline.append((now, final, sum(counts.values())))
            except Exception:  # noqa: BLE001 - schema not there yet, SQLite busy, disk full...
                self.errors += 1
            self.stop_event.wait(self.period)
        if engine is not None:
            engine.dispose()

    def _connect_args(self) -> dict:
        return {"timeout": 1} if self.url.startswith("sqlite") else {"connect_timeout": 5}


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    files_in: int = 0
    on_disk: int = 0
    states: Counter = field(default_factory=Counter)
    duplicates: int = 0
    lost: int = 0
    recover_s: list[float] = field(default_factory=list)
    drain_s: float | None = None
    exits: dict[str, int] = field(default_factory=dict)
    faults: int = 0
    rework: int = 0
    timed_out: bool = False
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    lost_detail: list[str] = field(default_factory=list)

    def recover_text(self) -> str:
        if not self.recover_s:
            return "n/a"
        if len(self.recover_s) == 1:
            return f"{self.recover_s[0]:.1f}"
        return f"{sum(self.recover_s) / len(self.recover_s):.1f} avg / {max(self.recover_s):.1f} max"


def evaluate(result: Result, url: str, drop: Path, feeder: Feeder, monitor: Monitor, faults_end: list[float]):
    """Compare what is on disk with the database; fill ``result``."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as connection:
        sources = connection.execute(text("SELECT path, image_id FROM source_files")).all()
        images = {
            row[0]: row[1:]
            for row in connection.execute(
                text("SELECT id, sha256, status, reason, attempts FROM images")
            ).all()
        }
        scores_per_image = connection.execute(
            text("SELECT image_id, count(*) FROM scores GROUP BY image_id HAVING count(*) > 1")
        ).all()
        paths_twice = connection.execute(
            text("SELECT path, count(*) FROM source_files GROUP BY path HAVING count(*) > 1")
        ).all()
    engine.dispose()
    by_path = {path: image_id for path, image_id in sources}
    disk = files_on_disk(drop)
    result.files_in = len(feeder.dropped)
    result.on_disk = len(disk)
    result.duplicates = len(scores_per_image) + len(paths_twice)
    for path, digest in disk.items():
        image = images.get(by_path.get(path))
        if image is None:
            result.lost += 1
            result.lost_detail.append(f"{Path(path).name}: no row")
            continue
        sha, status, reason, _ = image
        if sha != digest:
            result.lost += 1
            result.lost_detail.append(f"{Path(path).name}: row holds other content ({status})")
            continue
        result.states[status] += 1
        if status not in FINAL:
            result.lost += 1
            result.lost_detail.append(f"{Path(path).name}: {status}")
        elif status == "failed":
            result.notes.append(f"failed: {reason}")
    unfinished = sum(1 for _, status, _, _ in images.values() if status not in FINAL)
    if unfinished:
        result.notes.append(f"{unfinished} image(s) in the database not final")
    claimed = [attempts for _, _, _, attempts in images.values() if attempts]
    result.rework = sum(claimed) - len(claimed)
    # time to recover: end of each fault -> every file dropped before it (and still there) is final
    for fault_end in faults_end:
        before = [p for p, t in feeder.dropped.items() if t <= fault_end and p in disk]
        if not before:
            continue
        done = [monitor.final_at.get(p) for p in before]
        if all(t is not None for t in done):
            result.recover_s.append(max(0.0, max(done) - fault_end))
        else:
            result.notes.append("a fault's backlog never became final")
    last_drop = max(feeder.dropped.values(), default=None)
    finals = [monitor.final_at.get(p) for p in disk]
    if last_drop is not None and finals and all(t is not None for t in finals):
        result.drain_s = max(0.0, max(finals) - last_drop)


def wait_all_final(url: str, drop: Path, feeder: Feeder, deadline: float, monitor: Monitor) -> bool:
    """Until every file on disk has a final row with its current content, or the deadline."""
    while time.monotonic() < deadline:
        if feeder.done.is_set():
            from worker.scanner import is_temporary

            disk_paths = {str(p) for p in drop.rglob("*") if p.is_file() and not is_temporary(p.name)}
            # confirm with content hashes (a replaced file must be final with its new content)
            if disk_paths and disk_paths <= set(monitor.final_at) and _content_final(url, drop):
                return True
        time.sleep(1.0)
    return False


def _content_final(url: str, drop: Path) -> bool:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT s.path, i.sha256, i.status FROM source_files s JOIN images i ON i.id = s.image_id"
                )
            ).all()
    except Exception:  # noqa: BLE001
        return False
    finally:
        engine.dispose()
    known = {path: (sha, status) for path, sha, status in rows}
    for path, digest in files_on_disk(drop).items():
        sha, status = known.get(path, (None, None))
        if sha != digest or status not in FINAL:
            return False
    return True


# ----------------------------------------------------------------------------------------------
# scenarios
# ----------------------------------------------------------------------------------------------
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
        self.dir = WORK / self.name
        self.drop = self.dir / "drop"
        self.db_name = f"cxr_chaos_{self.name.replace('-', '_')}"
        self.result = Result(self.name)
        self.faults_end: list[float] = []
        self.services: dict[str, Service] = {}
        self.metrics_port: int | None = None

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
            CXR_TRIAGE_LEASE_SECONDS=str(LEASE_SECONDS),
            CXR_TRIAGE_DECODE_WORKERS="1",
            CXR_TRIAGE_LOG_LEVEL="INFO",
            CXR_TRIAGE_STABLE_SECONDS="1",
            CXR_TRIAGE_RESCAN_INTERVAL="30",
            PYTHONUNBUFFERED="1",
            TF_CPP_MIN_LOG_LEVEL="2",
        )
        return environ

    def prepare(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        self.drop.mkdir(parents=True)
        if not self.embedded:
            create_database(self.db_name)
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
                evaluate(self.result, self.monitor_url(), self.drop, feeder, monitor, self.faults_end)
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
                drop_database(self.db_name)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Readiness(threading.Thread):
    """Polls the worker's /readyz every 0.2 s from a fault's start until it is 200 again after it."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.started_at = time.monotonic()
        self.answers: list[tuple[float, int]] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        import urllib.error
        import urllib.request

        while not self.stop_event.wait(0.2):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as answer:
                    code = answer.status
            except urllib.error.HTTPError as error:
                code = error.code
            except OSError:
                code = 0
            self.answers.append((time.monotonic(), code))

    def note(self, what: str, fault_end: float) -> str:
        """Seconds from the fault to the first 503, and from the end of the fault to the next 200."""
        self.stop_event.set()
        down = next((t - self.started_at for t, code in self.answers if code == 503), None)
        up = next((t - fault_end for t, code in self.answers if t >= fault_end and code == 200), None)
        shown = [f"{x:.1f} s" if x is not None else "never" for x in (down, up)]
        return f"worker /readyz: 503 {shown[0]} after {what} went away, 200 again {shown[1]} after it came back"


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
        query = text("SELECT count(*) FROM images WHERE status = 'processing' AND updated_at > :since")

        def claimed_since(since: datetime) -> int:
            try:
                with engine.connect() as connection:
                    return connection.execute(query, {"since": since}).scalar_one()
            except Exception:  # noqa: BLE001
                return 0

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
            in_hand = claimed_since(since)
            pool_children = descendants(pid)
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            since = datetime.now(UTC)
            done += 1
            mid_batch += in_hand > 0
            self.faults_end.append(killed_at)
            log(
                f"kill-worker: SIGKILL {done}/{self.kills} to Celery pid {pid} with {in_hand} claimed "
                f"image(s) in hand ({len(pool_children)} child processes)"
            )
            time.sleep(3.0)
            orphans += sum(
                1 for child in pool_children if os.path.exists(f"/proc/{child}") and cmdline(child)
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
        legit = {pid, *descendants(pid)}
        stray = [p for p in group_members(pid) if p not in legit]
        if stray:
            rss_kb = sum(_rss_kb(p) for p in stray)
            self.result.notes.append(
                f"at the end, {len(stray)} orphaned process(es) of killed workers still running "
                f"({rss_kb / 1024:.0f} MB RSS in all): {', '.join(sorted({_short_cmd(p) for p in stray}))}"
            )


class RedisRestart(Scenario):
    name = "redis-restart"

    def inject(self, feeder, monitor, deadline) -> None:
        time.sleep(self.files / self.rate * 0.35)
        log("redis-restart: SIGKILL redis-server")
        readiness = Readiness(self.metrics_port)
        readiness.start()
        self.ctx.redis.kill()
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
        with open(filler, "wb") as handle:
            try:
                while True:
                    handle.write(b"\0" * 65536)
                    handle.flush()
                    written += 65536
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


# ----------------------------------------------------------------------------------------------
# reporting
# ----------------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = ""
    with contextlib.suppress(OSError, IndexError, ValueError):
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f", {kib / 1024 / 1024:.0f} GB RAM"
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores{memory}, no GPU, Linux {platform.release()}"


def git_revision() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    status = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    ).stdout.splitlines()
    product = sorted(
        line[3:] for line in status if line[3:].startswith(("pipeline/", "db/", "worker/", "models/"))
    )
    if not product:
        return done.stdout.strip()
    return f"{done.stdout.strip()} + uncommitted changes to {', '.join(product)}"


def table(results: list[Result]) -> str:
    header = (
        "| scenario | faults | files in | on disk at end | scored | rejected | failed | not final | "
        "duplicates | lost | recover (s) | drain (s) | unplanned exits | rework | elapsed (s) |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for r in results:
        not_final = sum(n for s, n in r.states.items() if s not in FINAL)
        exits = ", ".join(f"{k} {v}" for k, v in r.exits.items()) or "0"
        lines.append(
            f"| {r.name}{' (TIMED OUT)' if r.timed_out else ''} | {r.faults} | {r.files_in} | {r.on_disk} | "
            f"{r.states.get('scored', 0)} | {r.states.get('rejected', 0)} | {r.states.get('failed', 0)} | "
            f"{not_final} | {r.duplicates} | {r.lost} | {r.recover_text()} | "
            f"{'n/a' if r.drain_s is None else f'{r.drain_s:.1f}'} | {exits} | {r.rework} | "
            f"{r.elapsed_s:.0f} |"
        )
    return header + "\n".join(lines) + "\n"


def notes(results: list[Result]) -> str:
    out = []
    for r in results:
        merged = Counter(r.notes)
        for note, count in merged.items():
            out.append(f"* {r.name}: {note}" + (f" (x{count})" if count > 1 else ""))
        for detail in r.lost_detail[:5]:
            out.append(f"* {r.name}: lost {detail}")
        if len(r.lost_detail) > 5:
            out.append(f"* {r.name}: ... and {len(r.lost_detail) - 5} more lost")
    return "\n".join(out) + "\n"


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
                f"recover {result.recover_text()} s, {result.elapsed_s:.0f} s"
            )
    finally:
        proxy.stop()
        redis.stop()
    body = table(results)
    extra = notes(results)
    print(body)
    print(extra)
    summary = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "revision": git_revision(),
        "model": f"{model_version(model)} ({model})",
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
            f"own Redis and PostgreSQL 15 through a TCP proxy; lease {LEASE_SECONDS} s, rescan 30 s, "
            f"files dropped at {args.rate:g}/s; exits restarted after {RESTART_DELAY_S:.0f} s as systemd "
            "does. *lost* = a file on disk at the end without a final row for its current content; "
            "*duplicates* = images with more than one score plus paths registered twice; *recover* = "
            "from the end of a fault until every file dropped before it is final; *drain* = from the "
            "last drop until everything is final; *rework* = claims beyond the first.\n\n"
            + body
            + "\n"
            + extra
        )
        with open(REPO / "bench" / "RESULTS.md", "a") as handle:
            handle.write(section)
    failed = any(r.lost or r.duplicates or r.timed_out for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
