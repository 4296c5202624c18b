"""Prometheus metrics, health and readiness for every cxr-triage service.

The product calls the one-line hooks below (``metrics.decoded(...)``,
``metrics.inference(...)`` ...). They do nothing unless this process records
metrics: it serves ``/metrics`` itself (:func:`start`), or a supervisor that does
put ``PROMETHEUS_MULTIPROC_DIR`` in its environment (:func:`prepare_multiprocess`).
So with ``metrics_port`` unset (the default) the cost is one boolean test per call.

prometheus_client chooses between in-process and multiprocess values when it is
first imported, so :mod:`worker.metrics.definitions` is imported lazily, on the
first hook that records something, after the environment is settled.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from worker.metrics.state import MULTIPROC_VARIABLE, enable, enabled, multiprocess_dir
from worker.metrics.state import definitions as _d
from worker.metrics.state import state as _state
from worker.outcomes import ReasonClass, classify

if TYPE_CHECKING:
    from worker.metrics.server import MetricsServer

__all__ = [
    "MULTIPROC_VARIABLE",
    "ReasonClass",
    "classify",
    "enable",
    "enabled",
    "multiprocess_dir",
    "prepare_multiprocess",
    "start",
]

T = TypeVar("T")


def prepare_multiprocess() -> str:
    """Set up multiprocess mode in a supervisor, before any child starts and before prometheus_client
    is imported here: the children inherit the directory through the environment.

    An operator-chosen ``PROMETHEUS_MULTIPROC_DIR`` is emptied (files of an earlier run would be
    summed in); otherwise a fresh temporary directory is made.
    """
    import sys

    if "prometheus_client" in sys.modules and not multiprocess_dir():
        raise RuntimeError("prometheus_client was imported before multiprocess mode was set up")
    path = multiprocess_dir()
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, exist_ok=True)
    else:
        import atexit

        path = tempfile.mkdtemp(prefix="cxr-triage-metrics-")
        os.environ[MULTIPROC_VARIABLE] = path
        atexit.register(shutil.rmtree, path, True)  # ours: gone with the supervisor
    enable()
    return path


def start(settings, **kwargs) -> MetricsServer | None:
    """Serve /metrics, /healthz and /readyz on ``settings.metrics_port`` (None: off, returns None).

    Keyword arguments go to :class:`worker.metrics.server.Probe` (``model_check``, ``disk_paths``,
    ``workers``, ``broker``).
    """
    if settings.metrics_port is None:
        return None
    from worker.metrics.server import MetricsServer, Probe

    enable()
    try:
        server = MetricsServer(Probe(settings, **kwargs), settings.metrics_host, settings.metrics_port)
    except OSError as exc:  # port taken, address not local: a clear message, not a traceback
        raise SystemExit(
            f"cannot serve metrics on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}"
        ) from exc
    server.start()
    return server


# -- hooks: one line each at the call site ----------------------------------------------------------
def files_seen(count: int) -> None:
    if _state["on"] and count:
        _d().FILES_SEEN.inc(count)


def decoded(prepared: Iterable[Any]) -> None:
    """Decode time of each prepared file (``decode_seconds`` and ``attributes['source_format']``)."""
    if not _state["on"]:
        return
    histogram = _d().DECODE_SECONDS
    for item in prepared:
        seconds = getattr(item, "decode_seconds", None)
        if seconds is not None:
            histogram.labels(_format_of(item)).observe(seconds)


def timed_inference(score: Callable[[Any], T], tensors: Any) -> T:
    """``score(tensors)``, recording its duration and the batch size."""
    if not _state["on"]:
        return score(tensors)
    started = time.perf_counter()
    result = score(tensors)
    definitions = _d()
    definitions.INFERENCE_SECONDS.observe(time.perf_counter() - started)
    definitions.BATCH_SIZE.observe(len(tensors))
    return result


def claimed(first_seen: Iterable[datetime | None]) -> None:
    """Queue wait of images just claimed: registration to claim."""
    if not _state["on"]:
        return
    histogram, now = _d().QUEUE_WAIT_SECONDS, time.time()
    for moment in first_seen:
        if moment is not None:
            histogram.observe(max(now - _epoch(moment), 0.0))


def outcome(status: str, prepared: Any = None, first_seen: datetime | None = None, reason: str = "") -> None:
    """One image's outcome in a batch: ``scored``/``rejected``/``failed``/``superseded``, or ``retry``."""
    if not _state["on"]:
        return
    definitions = _d()
    status = str(getattr(status, "value", status))
    if status == "retry":
        definitions.RETRIES.labels("incomplete_file").inc()
        return
    source_format = _format_of(prepared)
    definitions.IMAGES.labels(status, source_format).inc()
    if status == "scored":
        if prepared is not None and prepared.attributes.get("out_of_scope"):
            definitions.OUT_OF_SCOPE.labels(source_format).inc()
        if first_seen is not None:
            definitions.DROP_TO_SCORE_SECONDS.observe(max(time.time() - _epoch(first_seen), 0.0))
    elif status in ("failed", "rejected"):
        text = reason or (getattr(prepared, "reason", None) if prepared is not None else None) or ""
        definitions.FAILURES.labels(status, classify(text or "file gone")).inc()


def retried(cause: str, count: int = 1) -> None:
    """``cause``: incomplete_file or database_unavailable (definitions.RETRY_CAUSES)."""
    if _state["on"] and count:
        _d().RETRIES.labels(cause).inc(count)


def resent(count: int) -> None:
    if _state["on"] and count:
        _d().RESENT.inc(count)


def worker_restarted(pid: int | None = None) -> None:
    """A worker process died and is restarted; its per-process gauges are dropped."""
    if not _state["on"]:
        return
    _d().WORKER_RESTARTS.inc()
    process_dead(pid)


def process_dead(pid: int | None) -> None:
    if pid is not None and multiprocess_dir():
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


def workers_alive(count: int) -> None:
    if _state["on"]:
        _d().WORKERS_ALIVE.set(count)


def model_loaded(scorer: Any = None) -> None:
    _state["model"] = True
    if _state["on"]:
        _d().MODEL_LOADED.set(1)


# -- helpers ----------------------------------------------------------------------------------------
_KNOWN_FORMATS = frozenset({"dicom", "png", "jpeg"})


def _format_of(prepared: Any) -> str:
    attributes = getattr(prepared, "attributes", None) or {}
    value = str(attributes.get("source_format") or "unknown")
    return value if value in _KNOWN_FORMATS else "unknown"


def _epoch(moment: datetime) -> float:
    if moment.tzinfo is None:  # SQLite gives naive datetimes; everything stored is UTC
        from datetime import UTC

        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


# -- one call per service ---------------------------------------------------------------------------
def model_is_loaded() -> bool:
    """Readiness of a process that scores in-process: a model was loaded here."""
    return bool(_state.get("model"))


def _with_port(settings, port: int | None):
    """A ``--metrics-port`` flag overrides the setting; without it the setting stands."""
    return settings if port is None else settings.with_changes(metrics_port=port)


def for_worker(settings, supervisor, port: int | None = None) -> MetricsServer | None:
    """``cxr-triage worker``: multiprocess mode set up before the supervisor starts any child, then
    the server (in the supervisor) answers with the sum over its worker processes."""
    settings = _with_port(settings, port)
    if settings.metrics_port is None:
        return None
    prepare_multiprocess()
    return start(settings, workers=supervisor.alive)


def for_watch(settings, roots: list[str], port: int | None = None) -> MetricsServer | None:
    """``cxr-triage watch``: scoring in-process needs the model loaded here; queueing needs only
    the broker. Free space is checked on the drop folders too."""
    settings = _with_port(settings, port)
    if settings.metrics_port is None:
        return None
    from worker.metrics.server import default_disk_paths, model_files_present

    disks = {**default_disk_paths(settings), "drop_folder": list(roots)}
    model_check = (lambda: model_files_present(settings)) if settings.broker_url else model_is_loaded
    return start(settings, model_check=model_check, disk_paths=disks)
