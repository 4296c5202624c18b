"""Metrics of real running processes: ``worker --processes 2`` and ``watch`` on Redis and PostgreSQL.

Files are scored for real, the endpoints are scraped over HTTP, parsed with
``prometheus_client.parser`` and compared with what the database says; a scrape is
checked with ``promtool check metrics``. Readiness: ``/readyz`` turns 503 within 5 s
of PostgreSQL or Redis becoming unreachable (a TCP proxy in front of each is cut,
as in ``bench/chaos``) and 200 again once they are back.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from db.engine import session_scope
from db.schema import Image, Score
from tests.conftest import (
    CLI,
    copy_into,
    kermany_files,
    services_env,
    start_cli,
    stop_group,
    wait_final,
)
from tests.ports import free_port
from worker.outcomes import classify

pytestmark = pytest.mark.services

DEADLINE_S = 300


def _env(pg_url: str, redis_url: str, **extra: str) -> dict[str, str]:
    return services_env(pg_url, redis_url, 60, CXR_TRIAGE_MIN_FREE_DISK_MB="1", **extra)


def _stop(process: subprocess.Popen) -> None:
    stop_group(process, timeout=90)


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_http(port: int, process: subprocess.Popen, log: Path, deadline_s: float = 120) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            get(port, "/healthz", timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"no metrics endpoint on {port}: {log.read_text()[-3000:]}")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, from the text format."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def total(found: dict, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def _corpus(kermany: Path, dicom_samples: dict[str, Path], folder: Path) -> int:
    files = kermany_files(kermany, "NORMAL", 3) + kermany_files(kermany, "PNEUMONIA", 3)
    copy_into([*files, dicom_samples["chest_j2k_lossless"], dicom_samples["sr"]], folder)
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image at all\n")
    return 10


def test_worker_and_watch_metrics_equal_the_database(pg_url, redis_url, kermany, dicom_samples, tmp_path):
    env = _env(pg_url, redis_url)
    subprocess.run([CLI, "db", "upgrade"], env=env, check=True, capture_output=True)
    worker_port, watch_port = free_port(), free_port()
    worker_log = tmp_path / "worker.log"
    worker = start_cli(["worker", "--processes", "2", "--metrics-port", str(worker_port)], env, worker_log)
    watcher = None
    try:
        wait_http(worker_port, worker, worker_log)
        backlog = tmp_path / "backlog"
        expected = _corpus(kermany, dicom_samples, backlog)
        scan = subprocess.run(
            [CLI, "scan", str(backlog), "--wait", "--no-progress"], env=env, capture_output=True, text=True
        )
        assert scan.returncode == 0, scan.stderr
        states = wait_final(pg_url, expected, DEADLINE_S)
        assert states == {"scored": 7, "rejected": 2, "failed": 1}, states

        status, text = get(worker_port, "/metrics")
        assert status == 200
        found = samples(text)
        for state in ("scored", "rejected", "failed"):
            assert total(found, "cxr_triage_images_total", status=state) == states[state], state
            if state != "scored":
                assert total(found, "cxr_triage_failures_total", status=state) == states[state], state
        assert total(found, "cxr_triage_decode_seconds_count") == expected  # both workers, summed
        assert total(found, "cxr_triage_inference_batch_size_sum") == states["scored"]
        assert total(found, "cxr_triage_drop_to_score_seconds_count") == states["scored"]
        assert total(found, "cxr_triage_queue_wait_seconds_count") == expected
        with session_scope(pg_url) as session:
            reasons = session.scalars(select(Image.reason).where(Image.status.in_(["rejected", "failed"])))
            by_class = Counter(classify(reason).value for reason in reasons)
        assert sum(by_class.values()) == 3
        for reason_class, count in by_class.items():
            assert total(found, "cxr_triage_failures_total", reason_class=reason_class) == count, reason_class
        assert total(found, "cxr_triage_workers_alive") == 2
        assert total(found, "cxr_triage_model_loaded") >= 1
        assert total(found, "cxr_triage_queue_depth") == 0
        with session_scope(pg_url) as session:
            high = session.scalar(
                select(func.count()).select_from(Score).where(Score.high_confidence_positive.is_(True))
            )
            out_of_scope = session.scalar(select(func.count()).where(Image.out_of_scope.is_(True)))
        assert total(found, "cxr_triage_unreviewed_images", tier="high") == high
        assert total(found, "cxr_triage_images_out_of_scope_total") == out_of_scope
        assert total(found, "cxr_triage_oldest_unreviewed_age_seconds", tier="high") > 0
        assert total(found, "cxr_triage_build_info") == 1
        _no_identifiers(text, pg_url, tmp_path)
        _promtool_check(text)
        assert json.loads(get(worker_port, "/readyz")[1])["status"] == "ready"

        # watch (queueing to the same workers): files seen here, scored there
        drop = tmp_path / "drop"
        drop.mkdir()
        watch_log = tmp_path / "watch.log"
        watcher = start_cli(
            ["watch", str(drop), "--stable-seconds", "1", "--metrics-port", str(watch_port)], env, watch_log
        )
        wait_http(watch_port, watcher, watch_log)
        time.sleep(2)  # let the observer start
        copy_into(kermany_files(kermany, "PNEUMONIA", 6)[3:], drop)
        states = wait_final(pg_url, expected + 3, DEADLINE_S)
        status, watch_text = get(watch_port, "/metrics")
        assert status == 200
        watched = samples(watch_text)
        assert total(watched, "cxr_triage_files_seen_total") == 3
        assert total(watched, "cxr_triage_queue_depth") == 0
        assert total(watched, "cxr_triage_dependency_up") == 4  # database, broker, model, disk
        _promtool_check(watch_text)
        found = samples(get(worker_port, "/metrics")[1])
        assert total(found, "cxr_triage_images_total", status="scored") == states["scored"] == 10
    finally:
        if watcher is not None:
            _stop(watcher)
        _stop(worker)


def _no_identifiers(text: str, url: str, tmp_path: Path) -> None:
    """No path, UID or patient attribute in any label."""
    with session_scope(url) as session:
        images = session.scalars(select(Image)).all()
        fields = ("study_uid", "sop_uid", "series_uid", "patient_id", "patient_name", "accession_number")
        secrets = {getattr(i, name) for i in images for name in fields if getattr(i, name)}
    assert str(tmp_path) not in text
    assert not [secret for secret in secrets if secret in text]


def _promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        return  # test_metrics.py skips visibly; .ci/run installs it
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


# -- readiness under outages ---------------------------------------------------------------------------
def _proxy(target_port: int):
    from bench.chaos.proxy import Proxy

    proxy = Proxy(free_port(), target_port, outage_seconds=3600)
    threading.Thread(target=proxy.serve, daemon=True).start()
    return proxy


def _restore(proxy) -> None:
    proxy.outage_until = 0.0  # serve() opens its listener again


def _until(port: int, code: int, within_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < within_s:
        try:
            if get(port, "/readyz", timeout=within_s)[0] == code:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"/readyz did not answer {code} within {within_s} s")


def test_readyz_follows_postgresql_and_redis_outages(pg_url, redis_url, tmp_path):
    pg, rd = make_url(pg_url), make_url(redis_url)
    pg_proxy, redis_proxy = _proxy(pg.port or 5432), _proxy(rd.port or 6379)
    try:
        time.sleep(0.3)
        env = _env(
            pg.set(port=pg_proxy.listen_port).render_as_string(hide_password=False),
            rd.set(port=redis_proxy.listen_port).render_as_string(hide_password=False),
        )
        port = free_port()
        log = tmp_path / "watch.log"
        drop = tmp_path / "drop"
        watcher = start_cli(["watch", str(drop), "--metrics-port", str(port)], env, log)
        try:
            wait_http(port, watcher, log)
            _until(port, 200, 30)
            for proxy, name in ((pg_proxy, "database"), (redis_proxy, "broker")):
                proxy.outage()
                took = _until(port, 503, 5.0)
                body = json.loads(get(port, "/readyz")[1])
                assert body["checks"][name] == "failing", body
                _restore(proxy)
                _until(port, 200, 30)
                print(f"{name}: 503 after {took:.2f} s")
        finally:
            _stop(watcher)
    finally:
        pg_proxy.stop()
        redis_proxy.stop()
