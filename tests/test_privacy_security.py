"""Credentials and paths: what `ps`, logs, database rows and output files can reveal or be steered to.

* Credentials never appear on a command line that ``ps`` shows: the deployment passes them in an
  environment file, and a running ``cxr-triage worker`` (supervisor, Celery children and their
  decode processes) carries them only in its environment, not in ``/proc/<pid>/cmdline``.
* Credentials are never logged: commands run with a password in the database and broker URLs at
  ``--log-level DEBUG`` print the masked form (``***``) and never the password.
* Crafted file names (``..``, newlines, escapes, very long) and crafted DICOM attributes (path-like
  UIDs and names) cannot steer rows or files outside the configured folders, and
  ``cxr-triage explain FILE -o OUT`` writes OUT and nothing else.

The log-privacy check over the shared DICOM corpus (patient identifiers) is in test_cli.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import CLI, REPO, kermany_files
from tests.dicom_factory import radiograph
from tests.ports import free_port

PASSWORD = "Pw-Zq7@s3cr3t"  # '@' must be percent-encoded in a URL
PASSWORD_IN_URL = PASSWORD.replace("@", "%40")
BROKER_PASSWORD = "Br0ker-Tk9x"


def _clean_env(**extra: str) -> dict[str, str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
    environ.update(extra)
    return environ


def _leaks(text: str) -> list[str]:
    return [secret for secret in (PASSWORD, PASSWORD_IN_URL, BROKER_PASSWORD, "s3cr3t") if secret in text]


def _pg_with_password(pg_url: str, port: int | None = None) -> str:
    """The test database URL with a password added (the test server trusts loopback, so it is ignored)."""
    from sqlalchemy.engine import make_url

    url = make_url(pg_url).set(password=PASSWORD)
    if port is not None:
        url = url.set(port=port)
    return url.render_as_string(hide_password=False)


# ----------------------------------------------------------------------------------------------
# deployment files
# ----------------------------------------------------------------------------------------------
def test_deployment_passes_credentials_in_an_environment_file():
    units = sorted((REPO / "deploy" / "systemd").glob("*.service"))
    assert units, "deploy/systemd has no service units"
    for unit in units:
        text = unit.read_text()
        assert "EnvironmentFile=" in text, unit.name
        for line in text.splitlines():
            if line.startswith(("ExecStart", "ExecStartPre")):
                assert "--database-url" not in line and "--broker-url" not in line, line
                assert "://" not in line, line
    env_example = (REPO / "deploy" / "cxr-triage.env.example").read_text()
    assert "CXR_TRIAGE_DATABASE_URL=" in env_example and "0600" in env_example
    for unit in sorted((REPO / "deploy" / "systemd").glob("cxr-triage-*")):
        text = unit.read_text()  # the nightly scan included: URLs come from the environment file
        assert "://" not in text and "--database-url" not in text, unit.name
    compose = (REPO / "compose.yaml").read_text()  # the password comes from .env, never written here
    assert not re.search(r"://[^/\s:@]+:[^@\s$]+@", compose)
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert not re.search(r"ENV\s+CXR_TRIAGE_(DATABASE|BROKER)_URL\s*=?\s*\S+:[^@\s]+@", dockerfile)


def test_readme_examples_never_put_a_password_on_the_command_line():
    readme = (REPO / "README.md").read_text()
    for line in readme.splitlines():
        if "cxr-triage " in line and ("--database-url" in line or "--broker-url" in line):
            assert not re.search(r"://[^/\s:@]+:[^@\s]+@", line), line


# ----------------------------------------------------------------------------------------------
# a running worker: /proc/<pid>/cmdline of the supervisor and every descendant
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def private_redis(tmp_path):
    """A Redis of our own that requires a password (so the broker URL carries a secret too)."""
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    process = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            BROKER_PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    end = time.monotonic() + 10
    while time.monotonic() < end:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    yield f"redis://:{BROKER_PASSWORD}@127.0.0.1:{port}/0"
    process.terminate()
    process.wait(timeout=10)


def _descendants(pid: int) -> list[int]:
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children.extend(int(c) for c in handle.read().split())
    except OSError:
        return []
    found = list(children)
    for child in children:
        found.extend(_descendants(child))
    return found


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.services
def test_running_worker_shows_no_password_in_cmdline_or_logs(pg_url, private_redis, tmp_path):
    database_url = _pg_with_password(pg_url)
    env = _clean_env(
        CXR_TRIAGE_DATABASE_URL=database_url,
        CXR_TRIAGE_BROKER_URL=private_redis,
        CXR_TRIAGE_DECODE_WORKERS="1",
        CXR_TRIAGE_LEASE_SECONDS="20",
        CXR_TRIAGE_LOG_LEVEL="DEBUG",
        PYTHONUNBUFFERED="1",
    )
    log = tmp_path / "worker.log"
    with open(log, "wb") as handle:
        supervisor = subprocess.Popen(
            [CLI, "worker", "--processes", "1"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        celery = []
        end = time.monotonic() + 90
        while time.monotonic() < end and not celery:
            assert supervisor.poll() is None, log.read_text(errors="replace")[-3000:]
            celery = [p for p in _descendants(supervisor.pid) if "celery" in _cmdline(p)]
            time.sleep(0.5)
        assert celery, "no celery child started: " + log.read_text(errors="replace")[-3000:]
        # let the Celery worker finish starting (it connects to the broker and may set a title)
        end = time.monotonic() + 60
        while time.monotonic() < end and "ready" not in log.read_text(errors="replace"):
            time.sleep(0.5)
        processes = [supervisor.pid, *_descendants(supervisor.pid)]
        assert len(processes) >= 2
        for pid in processes:
            line = _cmdline(pid)
            assert _leaks(line) == [], f"pid {pid}: {line}"
        ps = subprocess.run(["ps", "-eo", "pid,args", "ww"], capture_output=True, text=True).stdout
        assert _leaks(ps) == []
        # the environment does carry it (that is where it belongs; /proc/<pid>/environ is owner-only)
        environ = Path(f"/proc/{celery[0]}/environ").read_bytes().decode(errors="replace")
        assert PASSWORD_IN_URL in environ or PASSWORD in environ
        assert oct(os.stat(f"/proc/{celery[0]}/environ").st_mode & 0o777) == "0o400"
    finally:
        os.killpg(supervisor.pid, signal.SIGTERM)
        try:
            supervisor.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(supervisor.pid, signal.SIGKILL)
            supervisor.wait()
    output = log.read_text(errors="replace")
    assert _leaks(output) == [], "password in the worker's log"
    assert "***" in output, "the masked URL should be printed"


# ----------------------------------------------------------------------------------------------
# logs of short commands at DEBUG
# ----------------------------------------------------------------------------------------------
@pytest.mark.services
def test_password_never_logged_at_debug(pg_url, tmp_path, kermany, model_dir):
    database_url = _pg_with_password(pg_url)
    drop = tmp_path / "drop"
    drop.mkdir()
    for source in kermany_files(kermany, "NORMAL", 2):
        shutil.copyfile(source, drop / source.name)
    (drop / "broken.dcm").write_bytes(b"DICM" * 10)
    outputs = []
    commands = [
        ["db", "upgrade", "--log-level", "DEBUG"],
        ["scan", str(drop), "--no-progress", "--log-level", "DEBUG", "--decode-workers", "0"],
        ["worklist", "--log-level", "DEBUG"],
    ]
    env = _clean_env(CXR_TRIAGE_DATABASE_URL=database_url, CXR_TRIAGE_MODEL_DIR=str(model_dir))
    for args in commands:
        done = subprocess.run([CLI, *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(done.stdout + done.stderr)
    # and the error path: the database cannot be reached
    unreachable = _pg_with_password(pg_url, port=free_port())
    failed = subprocess.run(
        [CLI, "db", "upgrade", "--log-level", "DEBUG"],
        env=_clean_env(CXR_TRIAGE_DATABASE_URL=unreachable),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 2
    outputs.append(failed.stdout + failed.stderr)
    # a password given as a flag (discouraged, but it must not be echoed either)
    flagged = subprocess.run(
        [CLI, "worklist", "--database-url", database_url, "--log-level", "DEBUG"],
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert flagged.returncode == 0, flagged.stderr[-2000:]
    outputs.append(flagged.stdout + flagged.stderr)
    text = "\n".join(outputs)
    assert _leaks(text) == []
    assert "postgres:***@" in text
    assert "scored" in outputs[1] or "2 scored" in outputs[1]


# ----------------------------------------------------------------------------------------------
# crafted names and attributes cannot steer rows or files
# ----------------------------------------------------------------------------------------------
CRAFTED_NAMES = [
    "..\n..jpeg",
    "x..\n..jpeg",
    "...jpeg",
    "..%2f..%2fetc%2fpasswd.jpeg",
    "a\r\nINFO forged log line.jpeg",
    "\x1b]0;title\x07.jpeg",
    "L" * 250 + ".jpeg",
    " leading and trailing .jpeg ",
    "$(touch PWNED).jpeg",
    "`touch PWNED2`.jpeg",
]
PATH_LIKE = "../../../../tmp/cxr-escape"


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_crafted_names_and_attributes_stay_inside_the_folder(tmp_path, kermany, model_dir):
    root = tmp_path / "drop"
    root.mkdir()
    films = [np.asarray(Image.open(p).convert("L")) for p in kermany_files(kermany, "PNEUMONIA", 12)]
    for name, film in zip(CRAFTED_NAMES, films, strict=False):
        Image.fromarray(film).save(root / name, format="JPEG")
    crafted = root / "crafted.dcm"
    radiograph(films[-1].astype(np.uint16) * 16, crafted)
    import pydicom

    ds = pydicom.dcmread(crafted)
    ds.PatientName = PATH_LIKE
    ds.PatientID = "../" * 20 + "x"
    ds.AccessionNumber = "..\\..\\x"
    ds.SeriesDescription = "/etc/cron.d/evil\nroot"
    ds.StudyInstanceUID = "1.2.3.4/../../../x"
    ds.SOPInstanceUID = "1.2.3.5/../../../y"
    ds.save_as(crafted)
    url = f"sqlite:///{tmp_path / 'db' / 'w.sqlite3'}"
    before = _tree(tmp_path) | {str(p) for p in Path("/tmp").glob("cxr-escape*")}
    done = subprocess.run(
        [CLI, "scan", str(root), "--database-url", url, "--no-progress", "--log-level", "DEBUG"],
        env=_clean_env(CXR_TRIAGE_MODEL_DIR=str(model_dir), CXR_TRIAGE_DECODE_WORKERS="1"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # nothing was created except the database (and its WAL files) under the configured folder
    created = (_tree(tmp_path) | {str(p) for p in Path("/tmp").glob("cxr-escape*")}) - before
    assert {Path(p).name for p in created} <= {"db", "w.sqlite3", "w.sqlite3-wal", "w.sqlite3-shm"}, created
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "PWNED2").exists()
    # every row's path is the exact file, inside the scanned folder, and each file has one row
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT s.path, i.status FROM source_files s JOIN images i ON i.id = s.image_id")
        ).all()
    engine.dispose()
    paths = [path for path, _ in rows]
    # names starting with a dot are temporary by design (they wait to be renamed): no row
    expected = [name for name in [*CRAFTED_NAMES, "crafted.dcm"] if not name.startswith(".")]
    assert sorted(paths) == sorted(str(root / name) for name in expected)
    for path in paths:
        assert os.path.dirname(path) == str(root), path
    assert {status for _, status in rows} <= {"scored", "rejected", "failed"}
    # log lines name files by hash: a newline in a name cannot forge a log line
    logs = done.stdout + done.stderr
    assert "forged log line" not in logs and "PWNED" not in logs and PATH_LIKE not in logs


def test_explain_writes_only_the_given_output(tmp_path, kermany, model_dir):
    source = tmp_path / "in"
    source.mkdir()
    film = np.asarray(Image.open(kermany_files(kermany, "PNEUMONIA", 1)[0]).convert("L"))
    dicom = radiograph(film.astype(np.uint16) * 16, source / "..\n.dcm")
    import pydicom

    ds = pydicom.dcmread(dicom)
    ds.PatientName = PATH_LIKE
    ds.SOPInstanceUID = "1.2.3/../../overlay"
    ds.save_as(dicom)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    work = tmp_path / "cwd"
    work.mkdir()
    before = _tree(tmp_path)
    target = out_dir / "overlay.png"
    done = subprocess.run(
        [CLI, "explain", str(dicom), "-o", str(target)],
        env=_clean_env(CXR_TRIAGE_MODEL_DIR=str(model_dir)),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode == 2 and "No such command" in done.stderr:
        pytest.skip("this build has no explain command")
    assert done.returncode == 0, done.stderr[-3000:]
    assert _tree(tmp_path) - before == {str(target)}
    with Image.open(target) as overlay:
        assert overlay.format == "PNG"
    assert PATH_LIKE not in done.stdout + done.stderr
