"""Helpers for the web tests: a free port, a real `cxr-triage web` process, users made by the CLI."""

from __future__ import annotations

import os
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.conftest import CLI
from tests.ports import free_port


def cli(*args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )


def add_user(url: str, name: str, role: str, password: str) -> None:
    result = cli("users", "add", name, "--role", role, "--database-url", url, stdin=password + "\n")
    assert result.returncode == 0, result.stderr


@contextmanager
def web_server(url: str, log_path: Path, env: dict | None = None):
    """``cxr-triage web`` on a free loopback port (``env``: more environment); yields its base URL."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [CLI, "web", "--port", str(port), "--database-url", url],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("web server did not start: " + log_path.read_text()[-2000:])
            time.sleep(0.3)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
