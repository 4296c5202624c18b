"""``cxr-triage worker``: run and supervise Celery worker processes.

One worker process per GPU (``--gpus`` or ``CUDA_VISIBLE_DEVICES``), each seeing
only its own GPU; on a CPU machine ``--processes`` of them. Each process runs
Celery's *solo* pool: it holds one model and feeds it from its own pool of
decode processes, so decoding never serialises the accelerator. This
supervisor imports neither TensorFlow nor the model: TensorFlow is loaded only
inside each worker process.

The supervisor restarts a worker that dies and, every ``recover_interval``
seconds, re-sends work whose lease expired or whose message was lost.
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

from worker.celery_app import SCORE_QUEUE
from worker.settings import Settings

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
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "worker.celery_app",
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


def worker_env(settings: Settings, spec: WorkerSpec, decode_workers: int) -> dict[str, str]:
    environ = dict(os.environ)
    environ.update(
        {
            "CXR_TRIAGE_DATABASE_URL": settings.database_url,
            "CXR_TRIAGE_BROKER_URL": settings.broker_url or "",
            "CXR_TRIAGE_BATCH_SIZE": str(settings.batch_size),
            "CXR_TRIAGE_DECODE_WORKERS": str(decode_workers),
            "CXR_TRIAGE_LEASE_SECONDS": str(settings.lease_seconds),
            "CUDA_VISIBLE_DEVICES": spec.gpu if spec.gpu is not None else "",
            "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        }
    )
    if settings.model_dir:
        environ["CXR_TRIAGE_MODEL_DIR"] = str(settings.model_dir)
    from worker.dicomnet.plan import results_environment

    environ.update(results_environment(settings))  # workers create the outbox rows (issue 11)
    return environ


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        specs: list[WorkerSpec],
        decode_workers: int,
        log_level: str,
        recover_interval: float,
    ) -> None:
        self.settings = settings
        self.specs = specs
        self.decode_workers = decode_workers
        self.log_level = log_level
        self.recover_interval = recover_interval
        self.children: dict[str, subprocess.Popen] = {}
        self.stopping = False

    def _start(self, spec: WorkerSpec) -> None:
        # Own process group: when a worker dies, its decode processes can be reaped with it (they
        # never notice their parent's death on their own).
        self.children[spec.name] = subprocess.Popen(
            worker_command(spec, self.log_level),
            env=worker_env(self.settings, spec, self.decode_workers),
            process_group=0,
        )
        log.info(
            "started worker %s (pid %d, %s)",
            spec.name,
            self.children[spec.name].pid,
            f"GPU {spec.gpu}" if spec.gpu is not None else "CPU",
        )

    def _stop(self, *_args) -> None:
        self.stopping = True

    def run(self) -> int:
        from worker.distributed import recover_lost_work

        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        for spec in self.specs:
            self._start(spec)
        last_recover = time.monotonic()
        while not self.stopping:
            time.sleep(0.5)
            for spec in self.specs:
                child = self.children[spec.name]
                if child.poll() is not None:
                    log.warning("worker %s exited with code %s; restarting", spec.name, child.returncode)
                    _kill_group(child.pid)
                    self._start(spec)
            if time.monotonic() - last_recover >= self.recover_interval:
                last_recover = time.monotonic()
                try:
                    recover_lost_work(self.settings, stale_after_s=self.settings.lease_seconds)
                except Exception as exc:  # noqa: BLE001 - a DB or broker outage must not stop supervision
                    log.warning("could not check for lost work (%s); will retry", type(exc).__name__)
        for child in self.children.values():
            child.send_signal(signal.SIGTERM)  # warm shutdown: finish the batch in hand
        for child in self.children.values():
            try:
                child.wait(timeout=120)
            except subprocess.TimeoutExpired:
                child.kill()
            _kill_group(child.pid)
        return 0


def _kill_group(pgid: int) -> None:
    """Kill what is left of a worker's process group (orphaned decode processes)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
