"""Flower (the ``[ops]`` extra) against real workers: task events are on, so it lists them.

Documented in README (Operations): ``celery -A worker.queue.celery_app flower``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.conftest import start_cli
from tests.ports import free_port
from tests.test_metrics_services import _env, _stop

pytestmark = pytest.mark.services


def test_flower_starts_and_lists_a_worker(pg_url, redis_url, tmp_path):
    pytest.importorskip("flower", reason="flower is not installed (pip install 'cxr-triage[ops]')")
    env = _env(pg_url, redis_url)
    worker = start_cli(["worker", "--processes", "1"], env, tmp_path / "worker.log")
    port = free_port()
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.queue.celery_app", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        env={**env, "FLOWER_UNAUTHENTICATED_API": "true"},  # loopback only, for this test
        stdout=open(tmp_path / "flower.log", "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
        start_new_session=True,
    )
    try:
        names: list[str] = []
        deadline = time.monotonic() + 180
        while not any(name.startswith("cpu0@") for name in names):
            assert time.monotonic() < deadline, (tmp_path / "flower.log").read_text()[-3000:]
            assert flower.poll() is None, (tmp_path / "flower.log").read_text()[-3000:]
            time.sleep(2)
            try:
                url = f"http://127.0.0.1:{port}/api/workers?refresh=1"
                with urllib.request.urlopen(url, timeout=30) as answer:
                    names = list(json.loads(answer.read()))
            except OSError:
                continue
    finally:
        if flower.poll() is None:
            os.killpg(flower.pid, signal.SIGTERM)
            flower.wait(timeout=30)
        _stop(worker)
