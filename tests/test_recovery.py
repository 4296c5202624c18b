"""Issue 9 regressions on the real SQLite and PostgreSQL: attempts, leases, requeue, resend
bookkeeping, transient I/O, vanished files, errors at the CLI boundary, scan roots, watch folders."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select, text, update

from db import queue
from db.engine import session_scope
from db.migrate import upgrade
from db.queue import FileSeen, ScoreRecord
from db.schema import Image, ImageStatus, Score
from tests.conftest import CLI, kermany_files


def _env(**extra: str) -> dict[str, str]:
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_") or k == "CXR_TRIAGE_MODEL_DIR"
    }
    environ.update(extra)
    return environ


def run(*args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=_env(**extra), timeout=600)


def _register(url: str, path: str, sha: str | None = None, size: int = 10, mtime_ns: int = 1) -> int:
    with session_scope(url) as session:
        image_id, _ = queue.register(
            session, FileSeen(path, size, mtime_ns), sha or hashlib.sha256(path.encode()).hexdigest()
        )
    return image_id


def _register_file(url: str, path: Path) -> int:
    info = path.stat()
    return _register(
        url, str(path), hashlib.sha256(path.read_bytes()).hexdigest(), info.st_size, info.st_mtime_ns
    )


def _image(url: str, image_id: int) -> Image:
    with session_scope(url) as session:
        return session.get(Image, image_id)


# -- item 2 / item 4: attempts count real deaths only ------------------------------------------------


def test_an_attempt_is_counted_only_for_a_real_death(url):
    image_id = _register(url, "/drop/a.dcm")
    with session_scope(url) as session:
        assert queue.claim(session, [image_id], 600, owner="celery:h:1:task")[0] == [image_id]
        # the same task retried after a database outage takes it back: not a death
        assert queue.claim(session, [image_id], 600, owner="celery:h:1:task")[0] == [image_id]
        queue.release(session, [image_id])  # an error that is not a death hands it back
    assert _image(url, image_id).attempts == 0
    with session_scope(url) as session:
        queue.claim(session, [image_id], 600, owner="celery:h:1:task")
        assert queue.release_dead_owners(session, "celery:h:1:", lambda _o: True) == [image_id]
    image = _image(url, image_id)
    assert (image.status, image.attempts, image.lease_owner) == (ImageStatus.QUEUED, 1, None)


def test_leases_are_measured_on_the_database_clock(pg_url, monkeypatch):
    """This machine's clock is two hours fast; the lease still ends lease_seconds after the database's now."""
    import db.queue as db_queue

    upgrade(pg_url)
    image_id = _register(pg_url, "/drop/clock.dcm")
    real = db_queue.utcnow
    monkeypatch.setattr(db_queue, "utcnow", lambda: real() + timedelta(hours=2))
    with session_scope(pg_url) as session:
        queue.claim(session, [image_id], 600)
        remaining = session.scalar(
            select(text("extract(epoch from (lease_expires_at - now()))")).select_from(Image)
        )
        assert 540 < float(remaining) <= 600
        assert queue.requeue_expired(session) == []  # a fast local clock expires nothing


# -- item 2: requeue by status and reason ------------------------------------------------------------


def test_requeue_failed_images_by_reason(url):
    ids = [_register(url, f"/drop/{n}.dcm") for n in range(3)]
    with session_scope(url) as session:
        queue.record_problem(session, ids[0], ImageStatus.FAILED, "processing was interrupted 3 times (x)")
        queue.record_problem(session, ids[1], ImageStatus.FAILED, "truncated image data: 100%_done")
        queue.record_problem(session, ids[2], ImageStatus.REJECTED, "modality CT is not a projection")
        session.execute(update(Image).where(Image.id == ids[0]).values(attempts=3))
    result = run("requeue", "--status", "failed", "--reason", "interrupted", "--database-url", url)
    assert result.returncode == 0, result.stderr
    assert "1 image(s) put back" in result.stderr
    first = _image(url, ids[0])
    assert (first.status, first.attempts, first.reason, first.sent_at) == (ImageStatus.QUEUED, 0, None, None)
    assert _image(url, ids[1]).status == ImageStatus.FAILED
    with session_scope(url) as session:  # LIKE wildcards in the reason text are plain characters
        assert queue.requeue_by_status(session, ImageStatus.FAILED, "truncated%done") == []
        assert queue.requeue_by_status(session, ImageStatus.FAILED, "100%_done") == [ids[1]]
    assert _image(url, ids[2]).status == ImageStatus.REJECTED


# -- item 14 / 15: what was sent ---------------------------------------------------------------------


def test_sent_bookkeeping(url):
    ids = [_register(url, f"/drop/s{n}.dcm") for n in range(3)]
    with session_scope(url) as session:
        assert queue.never_sent(session, ids) == ids
        queue.mark_sent(session, ids[:2])
        assert queue.never_sent(session, ids) == [ids[2]]
        now = queue.db_now(session)
        assert queue.lost_ids(session, sent_before=now - timedelta(seconds=60)) == []
        assert set(queue.lost_ids(session, sent_before=now + timedelta(seconds=60))) == set(ids)


# -- item 17: a new model re-scores known films ------------------------------------------------------


def test_films_scored_by_an_older_model_are_rescored_in_place(url, kermany, model_dir, tmp_path):
    from worker.scoring.decode_pool import DecodePool
    from worker.scoring.processing import Processor
    from worker.settings import Settings

    files = [Path(shutil.copy(p, tmp_path)) for p in kermany_files(kermany, "PNEUMONIA", 2)]
    ids = [_register_file(url, path) for path in files]
    old = ScoreRecord("old-model", 0.1, -2.0, None, screening_threshold=0.5, high_confidence_threshold=0.9)
    with session_scope(url) as session:
        for image_id in ids:
            queue.record_score(session, image_id, old)
    settings = Settings(database_url=url, model_dir=model_dir, decode_workers=0)
    processor = Processor.from_settings(settings, DecodePool(0))
    version = processor.scorer.version
    with session_scope(url) as session:
        assert queue.outdated_ids(session, version, 10) == ids
    assert processor.rescore(ids[:1]) == 1  # interrupted after one: resumable, the rest is still outdated
    with session_scope(url) as session:
        assert queue.outdated_ids(session, version, 10) == ids[1:]
    assert processor.rescore(ids) == 1
    with session_scope(url) as session:
        assert queue.outdated_ids(session, version, 10) == []
        versions = session.execute(select(Score.image_id, Score.model_version)).all()
        statuses = set(session.scalars(select(Image.status)))
    assert sorted(versions) == sorted([(i, v) for i in ids for v in ("old-model", version)])
    assert statuses == {ImageStatus.SCORED}


# -- item 1 (processing) and item 9 (processing): transient I/O, vanished files ------------------------


def test_file_gone_from_every_path_is_superseded_not_failed(sqlite_url, kermany, model_dir, tmp_path):
    from worker.scoring.decode_pool import DecodePool
    from worker.scoring.processing import Processor
    from worker.settings import Settings

    upgrade(sqlite_url)
    path = Path(shutil.copy(kermany_files(kermany, "NORMAL", 1)[0], tmp_path / "replaced.jpeg"))
    image_id = _register_file(sqlite_url, path)
    path.unlink()
    settings = Settings(database_url=sqlite_url, model_dir=model_dir, decode_workers=0)
    outcome = Processor.from_settings(settings, DecodePool(0)).process([image_id])
    assert dict(outcome.counts) == {"superseded": 1}
    image = _image(sqlite_url, image_id)
    assert image.status == ImageStatus.SUPERSEDED and "no longer exists" in image.reason


#: Run as root without the capabilities that bypass file permissions: a chmod 000 file is unreadable.
WITHOUT_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv")
def test_a_file_unreadable_at_process_time_stays_queued(kermany, tmp_path):
    """chmod does not change mtime: had it been failed, every later scan would skip it for good."""
    folder = tmp_path / "in"
    folder.mkdir()
    film = Path(shutil.copy(kermany_files(kermany, "NORMAL", 1)[0], folder / "film.jpeg"))
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    image_id = _register_file(url, film)  # registered while readable, then the permission is lost
    film.chmod(0)
    denied = subprocess.run(
        [*WITHOUT_DAC, CLI, "scan", str(folder), "--database-url", url, "--no-progress"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert denied.returncode == 0, denied.stderr
    assert "0 failed" in denied.stderr and "1 queued" in denied.stderr, denied.stderr
    assert _image(url, image_id).status == ImageStatus.QUEUED
    film.chmod(0o644)  # fixed by an operator: the next scan scores it
    again = run("scan", str(folder), "--database-url", url, "--no-progress")
    assert again.returncode == 0 and "1 scored" in again.stderr, again.stderr


# -- item 2: the model is loaded before anything is claimed ------------------------------------------


def test_a_model_that_cannot_load_claims_nothing(kermany, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(kermany_files(kermany, "NORMAL", 1)[0], folder)
    broken = tmp_path / "model"
    broken.mkdir()
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    result = run("scan", str(folder), "--database-url", url, "--model-dir", str(broken), "--no-progress")
    assert result.returncode == 2
    assert "cannot load the model" in result.stderr and "Traceback" not in result.stderr
    with session_scope(url) as session:
        assert set(session.scalars(select(Image.status))) <= {ImageStatus.QUEUED}
    worker = run(
        "worker", "--broker-url", "redis://127.0.0.1:1/0", "--database-url", url, "--model-dir", str(broken)
    )
    assert worker.returncode == 2 and "cannot load the model" in worker.stderr


# -- item 5: errors at the CLI boundary ----------------------------------------------------------------


def test_database_errors_are_one_line_without_parameters(pg_url, tmp_path):
    """A database error while storing a DICOM film's attributes: one clear line, no traceback, and
    none of the bound parameters (patient name, id, accession number, UIDs)."""
    from tests import dicom_factory

    upgrade(pg_url)
    with session_scope(pg_url) as session:
        session.execute(
            text(
                "CREATE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                "IF NEW.patient_name IS NOT NULL THEN RAISE EXCEPTION 'store refused'; END IF; RETURN NEW; "
                "END $$ LANGUAGE plpgsql"
            )
        )
        session.execute(
            text("CREATE TRIGGER refuse BEFORE UPDATE ON images FOR EACH ROW EXECUTE FUNCTION refuse()")
        )
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    dicom_factory.radiograph(rng.integers(0, 4095, (256, 256), dtype=np.uint16), folder / "film.dcm")
    result = run("scan", str(folder), "--database-url", pg_url, "--no-progress", "--log-level", "DEBUG")
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "[parameters" not in output
    for value in (
        dicom_factory.PATIENT_NAME,
        dicom_factory.PATIENT_ID,
        dicom_factory.ACCESSION,
        "Testperson",
    ):
        assert value not in output
    assert "store refused" in output
    with session_scope(pg_url) as session:  # handed back, not stranded in `processing`, no attempt burnt
        image = session.scalars(select(Image)).one()
    assert (image.status, image.attempts) == (ImageStatus.QUEUED, 0)


# -- item 11: scan roots -----------------------------------------------------------------------------


def test_a_scan_root_that_is_a_symlink_is_scanned(kermany, tmp_path):
    archive = tmp_path / "archive"
    archive.mkdir()
    for source in kermany_files(kermany, "NORMAL", 2):
        shutil.copy(source, archive)
    link = tmp_path / "nightly"
    link.symlink_to(archive)
    result = run("scan", str(link), "--database-url", f"sqlite:///{tmp_path / 'w.sqlite3'}", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "2 files: 2 scored" in result.stderr


def test_a_root_with_nothing_to_score_says_so(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run("scan", str(empty), "--database-url", f"sqlite:///{tmp_path / 'w.sqlite3'}", "--no-progress")
    assert result.returncode == 1
    assert "nothing to score under" in result.stderr


# -- lower severity ------------------------------------------------------------------------------------


def test_watch_on_a_folder_it_cannot_create_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run("watch", str(blocker / "drop"), "--database-url", f"sqlite:///{tmp_path / 'w.sqlite3'}")
    assert result.returncode == 2
    assert "cannot create or open the drop folder" in result.stderr and "Traceback" not in result.stderr


def test_a_crashing_worker_is_restarted_with_backoff(tmp_path):
    from worker.queue.supervisor import MAX_RESTART_DELAY_S, Supervisor, WorkerSpec, _Child
    from worker.settings import Settings

    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    spec = WorkerSpec("cpu0", None)
    supervisor = Supervisor(Settings(database_url=url, broker_url="redis://127.0.0.1:1/0"), [spec])
    delays = []
    for _ in range(8):
        child: _Child = supervisor.children[spec.name]
        child.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        child.started = time.monotonic()
        child.process.wait()
        supervisor._on_death(spec, child)  # died at once after its (re)start
        delays.append(round(child.restart_at - time.monotonic()))
    assert delays[0] <= 0  # the first death is restarted at once
    assert delays == sorted(delays) and delays[1] >= 1 and delays[-1] == MAX_RESTART_DELAY_S


def test_a_scan_rescores_known_films_after_a_model_change(kermany, tmp_path):
    """Item 17, embedded: films scored by an older model get the current model's score when their
    folder is scanned again; they stay `scored` (and listed) throughout."""
    folder = tmp_path / "in"
    folder.mkdir()
    for source in kermany_files(kermany, "NORMAL", 2):
        shutil.copy(source, folder)
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    assert run("scan", str(folder), "--database-url", url, "--no-progress").returncode == 0
    with session_scope(url) as session:
        current = session.scalars(select(Score.model_version)).first()
        session.execute(update(Score).values(model_version="older-model"))
    again = run("scan", str(folder), "--database-url", url, "--no-progress")
    assert again.returncode == 0, again.stderr
    with session_scope(url) as session:
        versions = sorted(session.scalars(select(Score.model_version)))
        statuses = set(session.scalars(select(Image.status)))
    assert versions == sorted(["older-model", "older-model", current, current])
    assert statuses == {ImageStatus.SCORED}


def test_in_process_decoding_happens_under_a_claim(sqlite_url, kermany, model_dir, tmp_path, monkeypatch):
    """Issue 13: with decode processes, a batch is claimed after decoding (a child cannot kill the
    worker); decoding in this process must stay claimed first, so a file that kills the worker is
    counted as an interrupted attempt (and failed after MAX_ATTEMPTS) instead of retried forever."""
    import worker.scoring.decode_pool
    from worker.scoring.decode_pool import DecodePool
    from worker.scoring.processing import Processor
    from worker.settings import Settings

    upgrade(sqlite_url)
    path = Path(shutil.copy(kermany_files(kermany, "NORMAL", 1)[0], tmp_path / "film.jpeg"))
    image_id = _register_file(sqlite_url, path)
    seen: list[ImageStatus] = []
    real_prepare = worker.scoring.decode_pool.prepare

    def watching_prepare(*args, **kwargs):
        seen.append(_image(sqlite_url, image_id).status)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(worker.scoring.decode_pool, "prepare", watching_prepare)
    settings = Settings(database_url=sqlite_url, model_dir=model_dir, decode_workers=0)
    outcome = Processor.from_settings(settings, DecodePool(0)).process([image_id])
    assert dict(outcome.counts) == {"scored": 1}
    assert seen == [ImageStatus.PROCESSING]


def test_a_worker_killed_with_films_in_hand_is_restarted_at_once(tmp_path, redis_url):
    """Chaos suite (default settings): every kill of a busy worker counted as a start-up crash, so
    the restarts backed off to 60 s and a killed worker's batch took 69 s to be final. A worker that
    dies holding claimed films died at work: its films go back and it is restarted at once."""
    from worker.queue.supervisor import Supervisor, WorkerSpec, _Child
    from worker.settings import Settings, celery_owner_prefix

    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    spec = WorkerSpec("cpu0", None)
    supervisor = Supervisor(Settings(database_url=url, broker_url=redis_url), [spec])
    delays = []
    for n in range(6):
        child: _Child = supervisor.children[spec.name]
        child.process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        child.started = time.monotonic()
        image_id = _register(url, f"/drop/film-{n}.png")
        with session_scope(url) as session:
            owner = celery_owner_prefix(child.process.pid) + "task"
            assert queue.claim(session, [image_id], 900, owner)[0] == [image_id]
        child.process.wait()
        supervisor._on_death(spec, child)  # died soon after its start, but with a film in hand
        delays.append(round(child.restart_at - time.monotonic()))
        assert _image(url, image_id).status == ImageStatus.QUEUED
    assert all(delay <= 0 for delay in delays), delays


@pytest.mark.parametrize("claim_before_decode", [True, False])
def test_a_celery_worker_claims_before_its_decodes_finish(
    claim_before_decode, sqlite_url, kermany, model_dir, tmp_path, monkeypatch
):
    """A Celery worker (claim_before_decode) holds the lease while its pool decodes, so a kill hands
    the batch back at once; the embedded scan decodes first (no lease held while decoding)."""
    from worker.scoring.decode_pool import DecodePool, PendingBatch
    from worker.scoring.processing import Processor
    from worker.settings import Settings

    upgrade(sqlite_url)
    path = Path(shutil.copy(kermany_files(kermany, "NORMAL", 1)[0], tmp_path / "film.jpeg"))
    image_id = _register_file(sqlite_url, path)
    seen: list[ImageStatus] = []
    real_results = PendingBatch.results

    def watching_results(self):
        seen.append(_image(sqlite_url, image_id).status)
        return real_results(self)

    monkeypatch.setattr(PendingBatch, "results", watching_results)
    settings = Settings(database_url=sqlite_url, model_dir=model_dir, decode_workers=1)
    pool = DecodePool(1)
    try:
        processor = Processor.from_settings(settings, pool, claim_before_decode=claim_before_decode)
        assert dict(processor.process([image_id]).counts) == {"scored": 1}
    finally:
        pool.close()
    assert seen[0] == (ImageStatus.PROCESSING if claim_before_decode else ImageStatus.QUEUED)
