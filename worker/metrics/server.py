"""``/metrics``, ``/healthz`` and ``/readyz`` on one small HTTP server (or as ASGI routes for the web).

The gauges that come from the database (queue depth, age of the oldest unreviewed
film per tier, build and calibration info) and the readiness checks are computed
here, just before the answer, by the serving process: no custom collector, so the
same code works in prometheus_client's multiprocess mode (the supervisor serves
the sum over its worker processes) and in a single process (``watch``, ``web``).
Every check runs with a time limit, so an unreachable database or broker turns
``/readyz`` into a 503 within seconds instead of hanging the scrape.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from worker.metrics.state import definitions, enable, multiprocess_dir
from worker.settings import SCORE_QUEUE

log = logging.getLogger(__name__)

#: Seconds a readiness check or the database refresh may take before it counts as failed.
CHECK_TIMEOUT_S = 2.5
#: How old the per-site gauges (a week of films read and compared) may be before a scrape recomputes them.
SITE_GAUGES_MAX_AGE_S = 60.0
CONNECT_TIMEOUT_S = 2


class Probe:
    """Readiness checks and the scrape-time gauges of one service."""

    def __init__(
        self,
        settings,
        *,
        model_check: Callable[[], bool] | None = None,
        disk_paths: dict[str, list[str]] | None = None,
        workers: Callable[[], int] | None = None,
    ) -> None:
        self.settings = settings
        self.model_check = model_check or (lambda: model_files_present(settings))
        self.disk_paths = disk_paths or default_disk_paths(settings)
        self.workers = workers
        self._lock = threading.Lock()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="cxr-probe")
        self._engine = None
        self._redis = None
        self._build_labels: dict[str, str] | None = None
        self._calibration: dict[str, str] = {}
        #: the per-site gauges: the last result, and the computation in flight (not a readiness check)
        self._sites: list = []
        self._sites_at = -math.inf
        self._sites_job: concurrent.futures.Future | None = None

    # -- checks -------------------------------------------------------------------------------------
    def _database(self) -> dict:
        """Database reachable; the same round trip reads the gauges it feeds."""
        from worker.metrics.database import read_gauges

        if self._engine is None:
            self._engine = probe_engine(self.settings.database_url)
        return read_gauges(self._engine, self._model_version())

    def _site_gauges(self) -> list:
        from worker.metrics.database import read_site_gauges

        if self._engine is None:
            self._engine = probe_engine(self.settings.database_url)
        return read_site_gauges(self._engine)

    def _sites_started(self) -> concurrent.futures.Future | None:
        """The per-site computation: started when the last result is older than a minute and none
        runs; a scrape waits for it no longer than for the checks, then uses the last result."""
        if self._sites_job is None and time.monotonic() - self._sites_at > SITE_GAUGES_MAX_AGE_S:
            self._sites_job = self._pool.submit(self._site_gauges)
        return self._sites_job

    def _sites_finished(self) -> None:
        job = self._sites_job
        if job is None or not job.done():
            return
        self._sites_job = None
        self._sites_at = time.monotonic()
        if job.exception() is None:
            self._sites = job.result()
        else:
            log.debug("per-site gauges failed: %s", type(job.exception()).__name__)

    def _broker(self) -> int | None:
        url = self.settings.broker_url
        if not url:
            return None
        if url.split(":", 1)[0] in ("redis", "rediss", "unix"):
            import redis

            if self._redis is None:
                self._redis = redis.Redis.from_url(
                    url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S
                )
            return int(self._redis.llen(SCORE_QUEUE))
        from kombu import Connection

        with Connection(url, connect_timeout=CONNECT_TIMEOUT_S) as connection:
            connection.ensure_connection(max_retries=1, timeout=CONNECT_TIMEOUT_S)
        return None

    def _disks(self) -> dict[str, tuple[int, int]]:
        usage = {}
        for role, paths in self.disk_paths.items():
            found = [shutil.disk_usage(p) for p in paths if os.path.exists(p)]
            if found:
                worst = min(found, key=lambda u: u.free)
                usage[role] = (worst.free, worst.total)
        return usage

    def _model_version(self) -> str:
        if self._build_labels is None:
            self._build_labels = build_labels(self.settings)
        return self._build_labels["model_version"]

    # -- refresh ------------------------------------------------------------------------------------
    def refresh(self) -> dict[str, bool]:
        """Run every check (in parallel, time-limited) and set the gauges; returns check -> passed."""
        with self._lock:
            return self._refresh()

    def _refresh(self) -> dict[str, bool]:
        started = time.perf_counter()
        jobs = {
            "database": self._pool.submit(self._database),
            "broker": self._pool.submit(self._broker),
            "model": self._pool.submit(self.model_check),
            "disk": self._pool.submit(self._disks),
        }
        sites = self._sites_started()
        concurrent.futures.wait([*jobs.values(), *([sites] if sites else [])], timeout=CHECK_TIMEOUT_S)
        self._sites_finished()
        results: dict[str, Any] = {}
        passed: dict[str, bool] = {}
        for name, job in jobs.items():
            if not job.done():
                passed[name] = False
                continue
            error = job.exception()
            if error is not None:
                log.debug("readiness check %s failed: %s", name, type(error).__name__)
            passed[name] = error is None
            results[name] = None if error else job.result()
        if passed["model"] and results.get("model") is False:
            passed["model"] = False
        if not self.settings.broker_url:
            passed.pop("broker")
        floor = self.settings.min_free_disk_mb * 1024 * 1024
        if passed["disk"]:
            passed["disk"] = all(free >= floor for free, _ in results["disk"].values())
        self._set_gauges(results, passed, time.perf_counter() - started)
        return passed

    def _set_gauges(self, results: dict[str, Any], passed: dict[str, bool], took: float) -> None:
        d = definitions()
        for name in d.DEPENDENCIES:
            if name in passed:
                d.DEPENDENCY_UP.labels(name).set(1 if passed[name] else 0)
        gauges = results.get("database")
        if gauges:
            for status in d.QUEUE_STATUSES:
                d.QUEUE_DEPTH.labels(status).set(gauges["queue"].get(status, 0))
            for tier in d.TIERS:
                d.OLDEST_UNREVIEWED_AGE.labels(tier).set(gauges["oldest"].get(tier, 0.0))
                d.UNREVIEWED.labels(tier).set(gauges["unreviewed"].get(tier, 0))
            self._calibration = gauges.get("calibration") or {}
        _set_site_gauges(d, self._sites)
        if isinstance(results.get("broker"), int):
            d.BROKER_QUEUE_LENGTH.set(results["broker"])
        for role, (free, total) in (results.get("disk") or {}).items():
            d.DISK_FREE.labels(role).set(free)
            d.DISK_SIZE.labels(role).set(total)
        if self.workers is not None:
            d.WORKERS_ALIVE.set(self.workers())
        d.SCRAPE_REFRESH_SECONDS.set(took)

    # -- answers ------------------------------------------------------------------------------------
    def metrics_text(self) -> bytes:
        from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

        self.refresh()
        if multiprocess_dir():
            from prometheus_client.multiprocess import MultiProcessCollector

            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return generate_latest(registry) + generate_latest(_Families(self._build_info()))

    def _build_info(self) -> list:
        from prometheus_client.core import GaugeMetricFamily

        self._model_version()
        labels = {**(self._build_labels or {}), **self._calibration}
        family = GaugeMetricFamily(
            definitions().BUILD_INFO,
            "Versions in use (value 1): package, model, active calibration and its thresholds",
            labels=list(labels),
        )
        family.add_metric(list(labels.values()), 1)
        return [family]

    def readiness(self) -> tuple[int, dict]:
        passed = self.refresh()
        body = {
            "status": "ready" if all(passed.values()) else "not ready",
            "checks": {name: "ok" if ok else "failing" for name, ok in passed.items()},
        }
        return (200 if all(passed.values()) else 503), body


def _set_site_gauges(d, sites: list) -> None:
    """Each site's gauges. A value undefined now (no scored film, no calibration sample) is NaN: a
    removed series would linger in multiprocess mode, and NaN compares false in every alert rule."""
    nan = float("nan")
    for site in sites:
        values = (
            (d.SITE_FLAGGED, (site.site, "screening"), site.flagged_screen),
            (d.SITE_FLAGGED, (site.site, "high"), site.flagged_high),
            (d.SITE_REVIEWED, (site.site,), site.reviewed),
            (d.SITE_SCORE_PSI, (site.site,), site.psi),
            (d.SITE_SCORE_KS_P, (site.site,), site.ks_p_value),
            (d.SITE_SCORE_DRIFTED, (site.site,), float(site.drifted)),
            (d.SITE_FILMS_7D, (site.site,), float(site.films)),
            (d.SITE_LAST_FILM_AGE, (site.site,), site.last_film_age_seconds),
        )
        for gauge, labels, value in values:
            gauge.labels(*labels).set(nan if value is None else value)


class _Families:
    """Just enough of a registry for ``generate_latest``: metric families made for this scrape."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def probe_engine(url: str):
    """An engine for probes only: no pool (a dead server is noticed at once), short timeouts."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    backend = make_url(url).get_backend_name()
    if backend == "postgresql":
        args = {"connect_timeout": CONNECT_TIMEOUT_S, "options": "-c statement_timeout=2000"}
        return create_engine(url, poolclass=NullPool, connect_args=args)
    return create_engine(url, poolclass=NullPool, connect_args={"timeout": CONNECT_TIMEOUT_S})


def default_disk_paths(settings) -> dict[str, list[str]]:
    from sqlalchemy.engine import make_url

    paths: dict[str, list[str]] = {"work": [multiprocess_dir() or tempfile.gettempdir()]}
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        paths["database"] = [str(Path(url.database).parent)]
    return paths


def _model_metadata(settings) -> dict:
    return json.loads((Path(settings.resolved_model_dir()) / "metadata.json").read_text())


def model_files_present(settings) -> bool:
    """For processes that do not load TensorFlow themselves (the supervisor): the model folder is
    complete (metadata and weights), so the workers it starts can load it."""
    metadata = _model_metadata(settings)
    return (Path(settings.resolved_model_dir()) / metadata.get("model_file", "model.keras")).is_file()


def build_labels(settings) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("cxr-triage")
    except PackageNotFoundError:
        package = "unknown"
    try:
        metadata = _model_metadata(settings)
    except (OSError, ValueError):
        metadata = {}
    return {
        "version": package,
        "model_version": str(metadata.get("version", "unknown")),
        "calibration": "shipped",
        "screening_threshold": str(metadata.get("screening_threshold", "")),
        "high_confidence_threshold": str(metadata.get("high_confidence_threshold", "")),
    }


class _Handler(BaseHTTPRequestHandler):
    probe: Probe

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/metrics":
                from prometheus_client import CONTENT_TYPE_LATEST

                self._answer(200, self.probe.metrics_text(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._json(200, {"status": "alive"})
            elif path == "/readyz":
                self._json(*self.probe.readiness())
            else:
                self._json(404, {"error": "not found; try /metrics, /healthz or /readyz"})
        except Exception as exc:  # noqa: BLE001 - a scrape must never take the service down
            log.warning("metrics endpoint error: %s", type(exc).__name__)
            self._json(500, {"error": type(exc).__name__})

    def _json(self, code: int, body: dict) -> None:
        self._answer(code, (json.dumps(body) + "\n").encode(), "application/json")

    def _answer(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not log news
        pass


class MetricsServer:
    """The HTTP server in a daemon thread of the service it describes."""

    def __init__(self, probe: Probe, host: str, port: int) -> None:
        self.probe = probe
        handler = type("Handler", (_Handler,), {"probe": probe})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="cxr-metrics", daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def start(self) -> None:
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics (and /healthz, /readyz)", *self.httpd.server_address[:2])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def starlette_routes(settings, **probe_kwargs: Any) -> list:
    """``/metrics``, ``/healthz`` and ``/readyz`` as Starlette routes, for the web app to add:
    ``app.router.routes.extend(metrics.server.starlette_routes(settings))``."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    enable()
    probe = Probe(settings, **probe_kwargs)

    async def scrape(_request):
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(await run_in_threadpool(probe.metrics_text), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request):
        return JSONResponse({"status": "alive"})

    async def readyz(_request):
        code, body = await run_in_threadpool(probe.readiness)
        return JSONResponse(body, status_code=code)

    return [
        Route("/metrics", scrape, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
