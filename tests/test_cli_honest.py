"""Issue 25 items 16-18 (command line): honest answers from the commands.

Each test runs the real ``cxr-triage`` console script in a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CLI, kermany_files


def run(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **env)
    )


# -- item 17 ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command",
    [
        ["worklist"],
        ["worklist", "--format", "json"],
        ["audit"],
        ["outbox", "list"],
        ["model", "calibrations"],
    ],
)
def test_read_only_commands_refuse_a_database_that_does_not_exist(tmp_path, command):
    missing = tmp_path / "nonexistent" / "dir" / "x.db"
    done = run(*command, "--database-url", f"sqlite:///{missing}")
    assert done.returncode != 0 and done.stdout == ""
    assert "no database at" in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "nonexistent").exists()  # nothing created


def test_a_postgres_url_gets_the_driver_hint(tmp_path):
    done = run("worklist", "--database-url", "postgres://someone@127.0.0.1:5432/test")
    assert done.returncode == 2 and "write postgresql+psycopg:// instead of postgres://" in done.stderr
    assert "Traceback" not in done.stderr


def test_worklist_says_which_database_it_read_on_stderr(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    assert run("db", "upgrade", "--database-url", url).returncode == 0
    done = run("worklist", "--format", "json", "--database-url", url)
    assert done.returncode == 0 and json.loads(done.stdout) == []
    assert f"database: {url}" in done.stderr


# -- item 18 ---------------------------------------------------------------------------------------
def test_version_and_with_v_the_model_version(tmp_path):
    done = run("--version")
    assert done.returncode == 0 and done.stdout == f"cxr-triage {version('cxr-triage')}\n"
    model = tmp_path / "model"
    model.mkdir()
    (model / "metadata.json").write_text(json.dumps({"version": "model-2026-test"}))
    verbose = run("--version", "-v", CXR_TRIAGE_MODEL_DIR=str(model))
    assert verbose.returncode == 0
    assert verbose.stdout.splitlines() == [
        f"cxr-triage {version('cxr-triage')}",
        f"model model-2026-test ({model})",
    ]


def test_review_of_a_prefix_matching_nothing_says_so(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    done = run("review", "deadbeef00", "--database-url", url)
    assert done.returncode == 1 and "no film matches deadbeef00" in done.stderr
    assert "marked reviewed" not in done.stderr.replace("nothing marked reviewed", "")


def test_web_on_a_busy_port_fails_up_front_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
        done = run("web", "--host", "127.0.0.1", "--port", str(port), "--database-url", url, timeout=120)
    assert done.returncode == 2, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "web worklist on" not in done.stderr and "Traceback" not in done.stderr


def _distinct_films(kermany: Path, folder: Path, count: int) -> None:
    """``count`` different files (a pixel changed in each copy): each one is scored, none skipped."""
    from PIL import Image

    folder.mkdir()
    sources = kermany_files(kermany, "NORMAL", 8) + kermany_files(kermany, "PNEUMONIA", 8)
    for n in range(count):
        with Image.open(sources[n % len(sources)]) as image:
            pixels = np.asarray(image.convert("L")).copy()
        pixels[0, : n % pixels.shape[1] + 1] = n % 256
        Image.fromarray(pixels).save(folder / f"film{n:04d}.png")


def test_ctrl_c_during_a_scan_prints_interrupted_and_the_summary_and_exits_130(tmp_path, kermany):
    """SIGINT to the scan's whole process group, as a terminal's Ctrl-C sends it (decode children too)."""
    folder = tmp_path / "films"
    _distinct_films(kermany, folder, 400)
    db = tmp_path / "w.sqlite3"
    summary = tmp_path / "summary.json"
    process = subprocess.Popen(
        [CLI, "scan", str(folder), "--database-url", f"sqlite:///{db}", "--no-progress"]
        # small batches: the first scores are stored early and the scan lasts long enough to interrupt
        # (400 films in batches of 32 took 3.4 s on an idle VM: done before the first poll saw a score)
        + ["--summary-json", str(summary), "--decode-workers", "2", "--batch-size", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # as from a terminal: a test run started in the background (`cmd &` in a script) passes SIGINT
        # on ignored, and Python then installs no KeyboardInterrupt handler in the scan at all
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if db.exists():
                with sqlite3.connect(db) as connection:
                    try:
                        scored = connection.execute("SELECT count(*) FROM scores").fetchone()[0]
                    except sqlite3.OperationalError:  # the schema is still being made
                        scored = 0
                if scored:
                    break
            time.sleep(0.2)
        assert process.poll() is None, "the scan ended before it could be interrupted"
        os.killpg(process.pid, signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and " files: " in stderr and " scored, " in stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    record = json.loads(summary.read_text())
    assert record["interrupted"] is True and 0 < record["scored"] < 400
