"""``cxr-triage worker``: run and supervise Celery worker processes.

One worker process per GPU (``--gpus`` or ``CUDA_VISIBLE_DEVICES``), each seeing
only its own GPU; on a CPU machine ``--processes`` of them. Each process runs
Celery's *solo* pool: it holds one model and feeds it from its own pool of
decode processes, so decoding never serialises the accelerator. This
supervisor imports neither TensorFlow nor the model: TensorFlow is loaded only
inside each worker process.

The supervisor restarts a worker that dies (backing off when it dies at once,
and not at all when it cannot load its model), releases the leases the dead
worker held and re-sends its images at once, so a killed worker's batch is final
within seconds; every ``recover_interval`` seconds it re-sends work whose lease
expired (a machine that vanished) or whose message was lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from pipeline.model_folder import model_version
from worker import metrics
from worker.logs import describe_error
from worker.settings import ENV_FILE_VARIABLE, Settings, celery_owner_prefix, env_name

log = logging.getLogger(__name__)


def visible_gpus(requested: str | None) -> list[str]:
    """GPU ids to use: the flag, else CUDA_VISIBLE_DEVICES, else what nvidia-smi lists."""
    if requested is not None:
        return [g.strip() for g in requested.split(",") if g.strip()]
    from_env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if from_env is not None:
        return [g.strip() for g in from_env.split(",") if g.strip() and g.strip() != "-1"]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(listing.splitlines()) if line.startswith("GPU ")]


@dataclass
class WorkerSpec:
    name: str
    gpu: str | None


def worker_command(spec: WorkerSpec, log_level: str) -> list[str]:
    # Celery is imported where a worker is started: scan and watch use this module without a broker.
    from worker.queue.celery_app import SCORE_QUEUE

    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.queue.celery_app",
        "worker",
        "--pool",
        "solo",
        "--concurrency",
        "1",
        "--hostname",
        f"{spec.name}@%h",
        "--queues",
        SCORE_QUEUE,
        "--loglevel",
        log_level,
        "--without-gossip",
        "--without-mingle",
    ]


def worker_env(settings: Settings, spec: WorkerSpec) -> dict[str, str]:
    """The child's environment: this one, plus the settings it must rebuild (Settings.as_environment)."""
    own = {env_name(name) for name in Settings.model_fields} | {ENV_FILE_VARIABLE}
    # Settings' own variables come from ``settings`` only (a None setting must not leak the parent's).
    environ = {k: v for k, v in os.environ.items() if k not in own}
    environ.update(settings.as_environment())
    environ["CUDA_VISIBLE_DEVICES"] = spec.gpu if spec.gpu is not None else ""
    environ["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
    return environ


#: A worker that dies sooner than this after its start counts as crashing: its restarts back off.
HEALTHY_AFTER_S = 30.0
MAX_RESTART_DELAY_S = 60.0
#: Seconds between checks for scored films that the current model has not scored yet.
RESCORE_EVERY_S = 10.0


@dataclass
class _Child:
    process: subprocess.Popen | None = None
    started: float = 0.0
    crashes: int = 0
    restart_at: float = 0.0


class Supervisor:
    """Starts the worker processes, restarts dead ones (backing off when they crash at once),
    releases a dead worker's leases and re-sends its work at once, and re-sends lost work."""

    def __init__(self, settings: Settings, specs: list[WorkerSpec]) -> None:
        self.settings = settings
        self.specs = specs
        #: Lease expiry and lost messages are checked this often (the kill of a child is handled at once).
        self.recover_interval = max(min(settings.lease_seconds / 4, 60.0), 2.0)
        self.children: dict[str, _Child] = {spec.name: _Child() for spec in specs}
        self.stopping = False
        self.exit_code = 0
        self._rescored: dict[int, float] = {}

    def _start(self, spec: WorkerSpec) -> None:
        # Own process group: when a worker dies, its decode processes can be reaped with it (they
        # never notice their parent's death on their own).
        child = self.children[spec.name]
        child.process = subprocess.Popen(
            worker_command(spec, self.settings.log_level),
            env=worker_env(self.settings, spec),
            process_group=0,
        )
        child.started = time.monotonic()
        log.info(
            "started worker %s (pid %d, %s)",
            spec.name,
            child.process.pid,
            f"GPU {spec.gpu}" if spec.gpu is not None else "CPU",
        )

    def alive(self) -> int:
        """Worker processes running now (for the workers-alive gauge)."""
        return sum(1 for c in self.children.values() if c.process is not None and c.process.poll() is None)

    def _stop(self, *_args) -> None:
        self.stopping = True

    def _on_death(self, spec: WorkerSpec, child: _Child) -> None:
        """A child died: reap its group, hand its images back at once, schedule the restart."""
        process = child.process
        assert process is not None
        _kill_group(process.pid)
        child.process = None
        from worker.queue.celery_app import (
            EXIT_MODEL_UNUSABLE,  # loaded already: worker_command started the child
        )

        if process.returncode == EXIT_MODEL_UNUSABLE:
            log.error("worker %s cannot load its model; stopping (see its message above)", spec.name)
            self.exit_code, self.stopping = 2, True
            return
        log.warning("worker %s exited with code %s", spec.name, process.returncode)
        metrics.worker_restarted(process.pid)
        held = self._release_dead(process.pid)
        lived = time.monotonic() - child.started
        # A worker that had claimed films died at work (killed, out of memory), not in a start-up
        # crash loop: restart it at once, or its backlog waits on a growing back-off (chaos suite).
        child.crashes = child.crashes + 1 if lived < HEALTHY_AFTER_S and not held else 0
        delay = 0.0 if child.crashes <= 1 else min(2.0 ** (child.crashes - 1), MAX_RESTART_DELAY_S)
        child.restart_at = time.monotonic() + delay
        if delay:
            log.warning("worker %s keeps dying; restarting in %.0f s", spec.name, delay)

    def _release_dead(self, pid: int) -> int:
        """The dead child's leases go back to the queue (one attempt counted) and are re-sent now;
        returns how many it held."""
        from db import queue
        from db.engine import session_scope
        from worker.queue.submit import send_batches

        ids: list[int] = []
        try:
            with session_scope(self.settings.database_url) as session:
                ids = queue.release_dead_owners(session, celery_owner_prefix(pid), lambda _owner: True)
            if ids:
                send_batches(self.settings, ids)
                metrics.resent(len(ids))
                log.info("re-sent %d image(s) the dead worker held", len(ids))
        except Exception as exc:  # noqa: BLE001 - lease expiry remains the backstop
            problem = describe_error(exc)
            log.warning("could not release the dead worker's images (%s); their lease will", problem)
        return len(ids)

    def _supervise(self) -> None:
        now = time.monotonic()
        for spec in self.specs:
            child = self.children[spec.name]
            if child.process is not None and child.process.poll() is not None:
                self._on_death(spec, child)
            if child.process is None and not self.stopping and now >= child.restart_at:
                self._start(spec)

    def _recover(self) -> None:
        from worker.queue.submit import ViaCelery

        try:
            ViaCelery(self.settings).recover()
        except Exception as exc:  # noqa: BLE001 - a DB or broker outage must not stop supervision
            log.warning("could not check for lost work (%s); will retry", describe_error(exc))

    def _rescore(self) -> None:
        """Films scored by an older model are re-scored in the background: a few batches at a time,
        only while the queue is empty (new films first); resumable, the database says what is left."""
        from db import queue
        from db.engine import session_scope
        from worker.queue.submit import broker_backlog, send_rescore

        version = model_version(self.settings.resolved_model_dir())
        if version is None:
            return
        try:
            if broker_backlog(self.settings) > 0:
                return
            now = time.monotonic()
            self._rescored = {i: t for i, t in self._rescored.items() if now - t < 600}
            wanted = self.settings.batch_size * 2 * len(self.specs)
            with session_scope(self.settings.database_url) as session:
                ids = queue.outdated_ids(session, version, limit=wanted + len(self._rescored))
            ids = [i for i in ids if i not in self._rescored][:wanted]
            if ids:
                send_rescore(self.settings, ids)
                self._rescored.update(dict.fromkeys(ids, now))
                log.info("re-scoring %d film(s) with model %s", len(ids), version)
        except Exception as exc:  # noqa: BLE001 - background work; tried again later
            log.warning("could not queue re-scoring (%s)", describe_error(exc))

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        last_recover = last_rescore = time.monotonic()
        while not self.stopping:
            self._supervise()
            time.sleep(0.5)
            if time.monotonic() - last_recover >= self.recover_interval:
                last_recover = time.monotonic()
                self._recover()
            if time.monotonic() - last_rescore >= RESCORE_EVERY_S:
                last_rescore = time.monotonic()
                self._rescore()
        running = [c.process for c in self.children.values() if c.process is not None]
        for process in running:
            process.send_signal(signal.SIGTERM)  # warm shutdown: finish the batch in hand
        for process in running:
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
            _kill_group(process.pid)
        return self.exit_code


def _kill_group(pgid: int) -> None:
    """Kill what is left of a worker's process group (orphaned decode processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
