"""The product as a new user meets it: `cxr-triage scan` on a mixed folder, then the worklist."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.conftest import CLI, DICOM_DIR, REPO, kermany_files
from tests.test_pipeline import _png_with_declared_size

FINAL = {"scored", "rejected", "failed"}


#: The chest_dx role is the shared corpus's Fake_MONOHR1.dcm where ../shared is present (it displays
#: inverted), else a synthetic upright film (tests/conftest.py, dicom_samples).
_SHARED_CHEST_DX_IS_INVERTED = DICOM_DIR.is_dir()


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_") or k == "CXR_TRIAGE_MODEL_DIR"
    }
    environ.update(env or {})
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=environ, timeout=600)


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, kermany, dicom_samples) -> Path:
    folder = tmp_path_factory.mktemp("drop")
    for source in kermany_files(kermany, "NORMAL", 3) + kermany_files(kermany, "PNEUMONIA", 3):
        shutil.copyfile(source, folder / source.name)
    film = np.asarray(Image.open(kermany_files(kermany, "PNEUMONIA", 4)[3]).convert("L"))
    Image.fromarray(film.astype(np.uint16) * 257).save(folder / "film16.png")
    (folder / "copies").mkdir()
    shutil.copyfile(folder / "film16.png", folder / "copies" / "same-content.png")
    for role in ("chest_j2k", "chest_mono1", "chest_dx", "sr", "ct", "truncated"):
        source = dicom_samples[role]
        shutil.copyfile(source, folder / source.name.upper().replace(".DCM", ""))
    (folder / "empty.dcm").write_bytes(b"")
    (folder / "cut.jpeg").write_bytes((folder / "film16.png").read_bytes()[:2000])
    (folder / "README.txt").write_text("scanner notes")
    _png_with_declared_size(folder / "bomb.png", 300_000, 300_000)
    (folder / "upload.part").write_bytes(b"still copying")  # temporary name: ignored
    return folder


@pytest.fixture(scope="module")
def scanned(mixed_folder, tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'w.sqlite3'}"
    first = run("scan", str(mixed_folder), "--database-url", url)
    listing = run("worklist", "--format", "json", "--database-url", url)
    return url, first, json.loads(listing.stdout)


def test_every_file_ends_final_with_a_reason(scanned, mixed_folder):
    _, first, rows = scanned
    assert first.returncode == 0, first.stderr
    scored, rejected = (9, 4) if _SHARED_CHEST_DX_IS_INVERTED else (10, 3)
    assert re.search(
        rf"18 files: {scored} scored, {rejected} rejected, 4 failed, 0 skipped .* 1 duplicate content",
        first.stderr,
    )
    listed = {path for row in rows for path in row["paths"]}
    on_disk = {str(p) for p in mixed_folder.rglob("*") if p.is_file() and not p.name.endswith(".part")}
    assert listed == on_disk
    for row in rows:
        assert row["status"] in FINAL
        if row["status"] == "scored":
            assert 0.0 <= row["score"] <= 1.0 and row["model_version"] and row["threshold"] is not None
        else:
            assert row["reason"], row
    reasons = {Path(r["path"]).name: r["reason"] for r in rows if r["reason"]}
    assert "no pixel data" in reasons["TEST-SR"]
    assert "modality CT" in reasons["CT_SMALL"]
    assert reasons["empty.dcm"] == "empty file"
    assert "bomb" in reasons["bomb.png"]
    assert "not a DICOM, PNG or JPEG" in reasons["README.txt"]
    if _SHARED_CHEST_DX_IS_INVERTED:  # MONOCHROME1 header on uninverted pixels: the film displays
        assert "out of distribution" in reasons["FAKE_MONOHR1"]  # inverted; the OOD guard rejects it


def test_worklist_is_in_priority_order_with_dicom_identifiers(scanned):
    _, _, rows = scanned
    scored = [r for r in rows if r["status"] == "scored"]
    assert rows[: len(scored)] == scored, "scored films come first"
    priorities = [r["priority"] for r in scored]
    assert priorities == sorted(priorities, reverse=True)
    dicom_rows = [r for r in scored if r["source_format"] == "dicom"]
    # the shared corpus's third chest DICOM displays inverted and is rejected (OOD guard); a bare
    # clone's synthetic one is an upright chest film and is scored
    assert len(dicom_rows) == (2 if _SHARED_CHEST_DX_IS_INVERTED else 3)
    assert all(r["study_uid"] and r["sop_uid"] for r in dicom_rows)
    assert all(r["out_of_scope"] for r in dicom_rows)  # adults / no view recorded: flagged
    duplicate = next(r for r in rows if len(r["paths"]) == 2)
    assert {Path(p).name for p in duplicate["paths"]} == {"film16.png", "same-content.png"}


def test_second_scan_scores_nothing(scanned, mixed_folder):
    url, _, _ = scanned
    again = run("scan", str(mixed_folder), "--database-url", url, "--no-progress")
    assert again.returncode == 0
    assert re.search(r"18 files: 0 scored, 0 rejected, 0 failed, 18 skipped", again.stderr)


def test_table_and_csv_formats(scanned):
    url, _, rows = scanned
    table = run("worklist", "--database-url", url, "--limit", "3")
    assert table.returncode == 0 and "not a diagnostic device" in table.stderr
    csv_out = run("worklist", "--format", "csv", "--database-url", url, "--status", "failed")
    lines = csv_out.stdout.strip().splitlines()
    assert lines[0].startswith("path,sha256,status,reason,score") and len(lines) == 1 + 4


def test_env_var_configures_database(mixed_folder, tmp_path):
    url = f"sqlite:///{tmp_path / 'env.sqlite3'}"
    assert run("db", "upgrade", env={"CXR_TRIAGE_DATABASE_URL": url}).returncode == 0
    assert Path(tmp_path / "env.sqlite3").exists()
    result = run("worklist", "--format", "json", env={"CXR_TRIAGE_DATABASE_URL": url})
    assert result.returncode == 0 and json.loads(result.stdout) == []
    assert f"database: {url}" in result.stderr


def _identifying_values(dicom_dir: Path) -> set[str]:
    keywords = (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "AccessionNumber",
        "OtherPatientIDs",
        "InstitutionName",
        "ReferringPhysicianName",
        "StudyInstanceUID",
        "SOPInstanceUID",
    )
    values = set()
    for path in dicom_dir.rglob("*"):
        if not path.is_file() or path.suffix in (".tsv", ".csv", ".md"):
            continue
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            for keyword in keywords:
                value = str(ds.get(keyword, "") or "").strip()
                if len(value) >= 4:
                    values.add(value)
        except Exception:  # noqa: BLE001 - unreadable headers have nothing to leak
            continue
    return values


def test_debug_logs_hold_no_patient_identifiers(dicom_dir, tmp_path):
    values = _identifying_values(dicom_dir)
    assert len(values) > 20
    result = run(
        "scan",
        str(dicom_dir),
        "--database-url",
        f"sqlite:///{tmp_path / 'p.sqlite3'}",
        "--log-level",
        "DEBUG",
        "--no-progress",
    )
    assert result.returncode == 0
    logs = result.stdout + result.stderr
    assert "scored" in logs and "rejected" in logs  # debug lines were written
    leaked = sorted(v for v in values if v in logs)
    assert leaked == []


def test_embedded_watch_takes_complete_files_only(kermany, tmp_path):
    """Embedded watcher: a slowly written `.part` file is taken only once renamed into place."""
    import signal
    import time

    from tests.conftest import copy_into

    drop = tmp_path / "drop"
    drop.mkdir()
    url = f"sqlite:///{tmp_path / 'watch.sqlite3'}"
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_") or k == "CXR_TRIAGE_MODEL_DIR"
    }
    watcher = subprocess.Popen(
        [CLI, "watch", str(drop), "--database-url", url],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(4)
        copy_into(kermany_files(kermany, "NORMAL", 2), drop)
        source = kermany_files(kermany, "PNEUMONIA", 1)[0]
        data = source.read_bytes()
        with open(drop / "incoming.jpeg.part", "wb") as handle:
            for start in range(0, len(data), 4096):
                handle.write(data[start : start + 4096])
                handle.flush()
                time.sleep(0.3)
        time.sleep(1)
        listing = json.loads(run("worklist", "--format", "json", "--database-url", url).stdout)
        assert all(not r["path"].endswith(".part") for r in listing)
        (drop / "incoming.jpeg.part").rename(drop / "incoming.jpeg")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            listing = json.loads(run("worklist", "--format", "json", "--database-url", url).stdout)
            if len(listing) == 3 and all(r["status"] == "scored" for r in listing):
                break
            time.sleep(1)
        assert sorted(Path(r["path"]).name for r in listing) == sorted(
            [p.name for p in kermany_files(kermany, "NORMAL", 2)] + ["incoming.jpeg"]
        )
        assert all(r["status"] == "scored" for r in listing)
    finally:
        watcher.send_signal(signal.SIGTERM)
        output = watcher.communicate(timeout=60)[0]
    assert "3 scored" in output


def test_scan_resumes_work_of_a_killed_scan_at_once(kermany, tmp_path):
    """A scan killed mid-batch leaves leases owned by a dead process; the next scan takes them back."""
    import socket

    from sqlalchemy import delete, update

    from db.engine import session_scope
    from db.schema import Image, Score

    folder = tmp_path / "in"
    folder.mkdir()
    for source in kermany_files(kermany, "NORMAL", 2):
        shutil.copyfile(source, folder / source.name)
    url = f"sqlite:///{tmp_path / 'resume.sqlite3'}"
    assert run("scan", str(folder), "--database-url", url, "--no-progress").returncode == 0
    dead = f"local:{socket.gethostname()}:999999"  # no such process
    with session_scope(url) as session:  # as if the scan had been killed after claiming the batch
        session.execute(delete(Score))
        session.execute(
            update(Image).values(
                status="processing",
                lease_owner=dead,
                attempts=1,
                lease_expires_at=Image.first_seen_at + timedelta(days=1),
            )
        )
    again = run("scan", str(folder), "--database-url", url, "--no-progress")
    assert re.search(r"2 files: 2 scored", again.stderr), again.stderr


def test_scan_writes_a_machine_readable_summary(scanned, mixed_folder, tmp_path):
    """`scan --summary-json FILE`: the contract the benches read (issue 15 item 7)."""
    url, _, _ = scanned
    target = tmp_path / "summary.json"
    again = run(
        "scan", str(mixed_folder), "--database-url", url, "--no-progress", "--summary-json", str(target)
    )
    assert again.returncode == 0, again.stderr
    summary = json.loads(target.read_text())
    assert set(summary) == {
        "files",
        "scored",
        "rejected",
        "failed",
        "skipped",
        "duplicates",
        "queued",
        "elapsed_s",
        "images_per_s",
    }
    assert (summary["files"], summary["skipped"], summary["scored"], summary["queued"]) == (18, 18, 0, 0)
    assert summary["elapsed_s"] > 0 and summary["images_per_s"] == 0


def test_the_entry_sets_pydicoms_process_settings_before_any_thread_starts():
    """Issue 15 item 4: the process entry applies pydicom's settings (no identifiers in its warnings,
    wrong-length values read as UN). It imports pydicom to do so, on purpose: a lazy first import of
    pydicom in two threads at once (the outbox sender and the watcher) failed on the partly
    initialised ``pydicom.dataset`` in CI. (``scan`` is the one exception: see the next test.)"""
    probe = (
        "import sys; sys.argv = ['cxr-triage', '--help']; import worker.cli.app\n"
        "try:\n    worker.cli.app.main()\nexcept SystemExit:\n    pass\n"
        "from pydicom import config; assert config.settings.reading_validation_mode == config.IGNORE; "
        "assert config.convert_wrong_length_to_UN"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO, capture_output=True)


@pytest.mark.parametrize("decode_processes", [1, 0])
def test_a_scan_loads_pydicom_only_where_it_reads_dicom(tmp_path, dicom_samples, decode_processes):
    """#13: the entry leaves pydicom unloaded for ``scan`` (~0.3 s of start-up). With decode processes
    the scan's own process never loads it, and the DICOM film is still scored by a child (which sets
    pydicom's settings itself); decoding in-process, the pool sets the settings before the first film."""
    (tmp_path / "drop").mkdir()
    shutil.copyfile(dicom_samples["chest_j2k"], tmp_path / "drop" / "film.dcm")
    probe = (
        "import json, sys; folder, summary = sys.argv[1:]\n"
        "sys.argv = ['cxr-triage', 'scan', folder, '--no-progress', '--summary-json', summary]\n"
        "import worker.cli.app\n"
        "try:\n    worker.cli.app.main()\nexcept SystemExit:\n    pass\n"
        "loaded = 'pydicom' in sys.modules\n"
        "from pydicom import config\n"
        "configured = config.settings.reading_validation_mode == config.IGNORE\n"
        "print(json.dumps([loaded, configured, json.load(open(summary))['scored']]))"
    )
    env = {
        **os.environ,
        "CXR_TRIAGE_DATABASE_URL": f"sqlite:///{tmp_path / 'w.sqlite3'}",
        "CXR_TRIAGE_DECODE_WORKERS": str(decode_processes),
    }
    env.pop("CXR_TRIAGE_RESULTS_DESTINATION", None)
    folder, summary = str(tmp_path / "drop"), str(tmp_path / "summary.json")
    done = subprocess.run(
        [sys.executable, "-c", probe, folder, summary], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    loaded, configured, scored = json.loads(done.stdout.splitlines()[-1])
    assert scored == 1
    assert (loaded, configured) == ((False, False) if decode_processes else (True, True))


def test_a_plain_command_loads_no_dicom_celery_or_web_stack():
    """Startup cost of every command (the rescan's memory, bench/RESULTS.md benchmark 5): the CLI module
    and a command's settings load none of the heavy stacks that only some commands use (pydicom, and
    the numpy and Pillow it imports, are loaded by the entry on purpose: see the test above)."""
    probe = (
        "import sys, worker.cli.app; from pipeline.dicom import configure_pydicom; configure_pydicom(); "
        "heavy = {'highdicom', 'pynetdicom', 'celery', 'kombu', 'redis', 'fastapi', 'starlette', "
        "'jinja2', 'matplotlib', 'tensorflow', 'keras', 'ai_edge_litert', 'prometheus_client'}; "
        "loaded = sorted(heavy & {name.split('.')[0] for name in sys.modules}); assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO)
