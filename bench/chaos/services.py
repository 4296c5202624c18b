"""The chaos runs' own services: a restartable Redis, the PostgreSQL proxy, cxr-triage processes.

Processes are started in their own sessions and restarted RESTART_DELAY_S after any exit, as
systemd does with the shipped units (``Restart=always``, ``RestartSec=5``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.databases import database_url
from bench.processes import children, cmdline, wait_port

REPO = Path(__file__).resolve().parents[2]
WORK = REPO / ".work" / "chaos"
CLI = str(Path(sys.executable).parent / "cxr-triage")
PG_ADMIN = os.environ.get("CXR_CHAOS_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_PORT = 5432
PROXY_PORT = 65432
REDIS_PORT = 6391
RESTART_DELAY_S = 5.0
#: Issue 9: with default settings, a SIGKILLed process's work is final within this many seconds.
KILL_TARGET_S = 60.0


def log(message: str) -> None:
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} chaos: {message}\n")
    sys.stderr.flush()


def pg_url(name: str, port: int) -> str:
    """URL of chaos database ``name`` on the real server (PG_PORT) or through the proxy (PROXY_PORT)."""
    return database_url(name, PG_ADMIN, port)


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


def celery_worker_pid(supervisor: Service) -> int | None:
    pid = supervisor.pid()
    if pid is None:
        return None
    for child in children(pid):
        line = cmdline(child)
        if "celery" in line and "worker.queue.celery_app" in line:
            return child
    return None


def short_cmd(pid: int) -> str:
    """A short name for a leftover process in reports."""
    line = cmdline(pid)
    if "multiprocessing" in line and "resource_tracker" in line:
        return "multiprocessing resource tracker"
    if "multiprocessing" in line:
        return "multiprocessing spawn child (decode pool)"
    return line[:60]
