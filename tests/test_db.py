"""Queue transitions and the worklist, on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import os
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from db import queue
from db.engine import session_scope
from db.migrate import upgrade
from db.queue import FileSeen
from db.schema import Image, ImageStatus, Score, SourceFile, utcnow
from db.worklist import build_worklist
from tests.conftest import score_record


def _register(url: str, path: str, sha: str) -> int:
    with session_scope(url) as session:
        image_id, _ = queue.register(session, FileSeen(path, 10, 1), sha)
    return image_id


def test_same_content_two_paths_is_one_image(url):
    first = _register(url, "/drop/a.dcm", "a" * 64)
    second = _register(url, "/archive/copy-of-a.dcm", "a" * 64)
    assert first == second
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(SourceFile)) == 2
        entry = build_worklist(session)[0]
    assert entry.paths == ["/drop/a.dcm", "/archive/copy-of-a.dcm"]


def test_score_written_once_when_delivered_twice(url):
    image_id = _register(url, "/drop/a.dcm", "b" * 64)
    with session_scope(url) as session:
        claimed, _ = queue.claim(session, [image_id], lease_seconds=60)
    assert claimed == [image_id]
    for _ in range(2):  # a redelivered task writes the same result again
        with session_scope(url) as session:
            queue.record_score(session, image_id, score_record(0.9))
    with session_scope(url) as session:
        assert session.scalar(select(func.count()).select_from(Score)) == 1
        assert session.get(Image, image_id).status == ImageStatus.SCORED
        # a second claim of a final image takes nothing
        assert queue.claim(session, [image_id], 60) == ([], [])


def test_lease_expiry_and_attempt_limit(url):
    image_id = _register(url, "/drop/killer.dcm", "c" * 64)
    for attempt in range(1, queue.MAX_ATTEMPTS + 1):
        with session_scope(url) as session:
            claimed, exhausted = queue.claim(session, [image_id], lease_seconds=60)
            assert claimed == [image_id] and not exhausted
            # a live lease cannot be claimed twice
            assert queue.claim(session, [image_id], 60) == ([], [])
            # the worker dies: the lease runs out
            session.execute(update(Image).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        with session_scope(url) as session:
            assert queue.requeue_expired(session) == [image_id]
            assert session.get(Image, image_id).attempts == attempt
    with session_scope(url) as session:
        claimed, exhausted = queue.claim(session, [image_id], 60)
        assert claimed == [] and exhausted == [image_id]
        image = session.get(Image, image_id)
        assert image.status == ImageStatus.FAILED and "interrupted 3 times" in image.reason


def test_unchanged_files_are_found_without_hashing(url):
    _register(url, "/drop/a.dcm", "d" * 64)
    with session_scope(url) as session:
        same = queue.find_unchanged(session, [FileSeen("/drop/a.dcm", 10, 1)])
        touched = queue.find_unchanged(session, [FileSeen("/drop/a.dcm", 10, 2)])
    assert list(same) == ["/drop/a.dcm"] and touched == {}


def test_worklist_order_and_aging(url):
    names = ("high", "screen", "low-fresh", "low-old", "failed", "queued")
    ids = {name: _register(url, f"/drop/{name}", f"{n:x}" * 64) for n, name in enumerate(names)}
    with session_scope(url) as session:
        queue.claim(session, list(ids.values()), 60)
        queue.record_score(session, ids["high"], score_record(0.95))
        queue.record_score(session, ids["screen"], score_record(0.4))
        queue.record_score(session, ids["low-fresh"], score_record(0.05))
        queue.record_score(session, ids["low-old"], score_record(0.05))
        queue.record_problem(session, ids["failed"], ImageStatus.FAILED, "truncated image data")
        queue.release(session, [ids["queued"]])
        # low-old arrived 30 days ago: aging (10 points a day) lifts it above a fresh 0.95
        session.execute(
            update(Image)
            .where(Image.id == ids["low-old"])
            .values(first_seen_at=utcnow() - timedelta(days=30))
        )
    with session_scope(url) as session:
        order = [entry.path.removeprefix("/drop/") for entry in build_worklist(session)]
        assert order == ["low-old", "high", "screen", "low-fresh", "failed", "queued"]
        failed = build_worklist(session, status="failed")
        assert [e.reason for e in failed] == ["truncated image data"]
        assert queue.mark_reviewed(session, "0" * 10, "dr-x") == 1
    with session_scope(url) as session:
        order = [entry.path.removeprefix("/drop/") for entry in build_worklist(session)]
        assert order[-1] == "high"


def test_a_retried_task_takes_back_its_own_lease(url):
    image_id = _register(url, "/drop/a.dcm", "e" * 64)
    with session_scope(url) as session:
        assert queue.claim(session, [image_id], 600, owner="task-1")[0] == [image_id]
    with session_scope(url) as session:
        assert queue.claim(session, [image_id], 600, owner="task-2")[0] == []  # someone else's live lease
        assert queue.claim(session, [image_id], 600, owner="task-1")[0] == [image_id]
        assert session.get(Image, image_id).attempts == 0  # a retry is not a death (issue 9 item 2)


# ----------------------------------------------------------------------------------------------
# issue 9: regression tests (each failed on the main branch before its fix)
# ----------------------------------------------------------------------------------------------
def test_masked_hides_every_password():
    from db.engine import masked

    cases = {
        "redis://:p@ss@host/0": "redis://:***@host/0",  # unescaped '@' in the password
        "postgresql+psycopg://u@h/db?password=s3cret&sslmode=require": (
            "postgresql+psycopg://u@h/db?password=***&sslmode=require"
        ),
        "postgresql+psycopg://u:p%40w@h:5432/db": "postgresql+psycopg://u:***@h:5432/db",
        "sqlite:////var/lib/x.sqlite3": "sqlite:////var/lib/x.sqlite3",
        "redis://127.0.0.1:6379/0": "redis://127.0.0.1:6379/0",
    }
    for url, shown in cases.items():
        assert masked(url) == shown
        assert "ss@host" not in masked(url) and "s3cret" not in masked(url)


def test_database_errors_never_show_bound_parameters(url):
    from sqlalchemy import insert
    from sqlalchemy.exc import IntegrityError

    values = {"sha256": "f" * 64, "status": "queued", "size_bytes": 1, "attempts": 0, "out_of_scope": False}
    values.update(patient_name="DOE^JOHN", patient_id="MRN12345", first_seen_at=utcnow(), updated_at=utcnow())
    with session_scope(url) as session:
        session.execute(insert(Image).values(**values))
    with pytest.raises(IntegrityError) as raised, session_scope(url) as session:
        session.execute(insert(Image).values(**values))
    assert "DOE^JOHN" not in str(raised.value) and "MRN12345" not in str(raised.value)


def test_sqlite_database_folder_and_file_are_private(tmp_path):
    import stat

    folder = tmp_path / "data" / "cxr-triage"
    url = f"sqlite:///{folder / 'worklist.sqlite3'}"
    old_umask = os.umask(0o022)
    try:
        upgrade(url)
        _register(url, "/drop/a.dcm", "a" * 64)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
    for path in folder.iterdir():  # the database and its -wal/-shm files
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def _claimed(url: str, path: str, sha: str) -> int:
    image_id = _register(url, path, sha)
    with session_scope(url) as session:
        assert queue.claim(session, [image_id], 60)[0] == [image_id]
    return image_id


def test_header_values_longer_than_their_columns_are_stored_safely(url):
    """PostgreSQL raised DataError for a View Position longer than 16 characters: the film failed."""
    from db.attributes import DICOM_ATTRIBUTES

    long_uid = "1.2." + "3" * 200
    attributes = {
        "view_position": "POSTERO-ANTERIOR ERECT",
        "modality": "DX" * 20,
        "patient_name": "DOE^" + "J" * 400 + "\x00",
        "patient_id": "M" * 300,
        "accession_number": "A" * 100,
        "study_uid": long_uid,
        "series_uid": "1.2.3",
        "sop_uid": long_uid,
        "patient_age_years": float("nan"),
        "source_format": "dicom",
        "out_of_scope": True,
        "scope_note": "x" * 5000,
        "a_field_without_a_column": "ignored",
    }
    scored = _claimed(url, "/drop/long.dcm", "1" * 64)
    failed = _claimed(url, "/drop/long2.dcm", "2" * 64)
    with session_scope(url) as session:
        assert queue.record_score(session, scored, score_record(0.5), attributes)
        assert queue.record_problem(session, failed, ImageStatus.REJECTED, "lateral view", attributes)
    with session_scope(url) as session:
        for image_id in (scored, failed):
            image = session.get(Image, image_id)
            assert image.view_position == "POSTERO-ANTERIOR"  # cut to the 16-character column
            assert image.patient_name.startswith("DOE^J") and "\x00" not in image.patient_name
            assert image.study_uid is None and image.sop_uid is None  # a cut UID would name another study
            assert image.series_uid == "1.2.3" and image.patient_age_years is None
            assert image.out_of_scope is True and image.source_format == "dicom"
    assert {a.name for a in DICOM_ATTRIBUTES} >= {"study_uid", "view_position", "patient_name"}


def test_reasons_never_carry_file_paths(url, tmp_path):
    """Pillow's message names the file; the stored reason must not (paths identify patients)."""
    from pipeline.decode import decode_file
    from pipeline.errors import ImageProblem

    bad = tmp_path / "DOE_JOHN_MRN12345.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + b"\x00" * 13)
    with pytest.raises(ImageProblem) as raised:
        decode_file(bad)
    image_id, other = _claimed(url, str(bad), "3" * 64), _claimed(url, "/x/y", "4" * 64)
    with session_scope(url) as session:
        queue.record_problem(session, image_id, ImageStatus.FAILED, raised.value.reason)
        queue.record_problem(session, other, ImageStatus.FAILED, "at /drop/A B/c.png.")
    with session_scope(url) as session:
        reasons = [session.get(Image, i).reason for i in (image_id, other)]
    assert all("DOE_JOHN" not in r and "/drop" not in r and str(tmp_path) not in r for r in reasons), reasons
    assert reasons[0].startswith("cannot decode image")
    # the backstop keeps the words of a reason (a file may be called "DICOM"), and plain numbers
    kept = "not a DICOM, PNG or JPEG file; 3/4 of 512x512"
    assert queue.scrub_reason(kept, ["/drop/DICOM", "/drop/image"]) == kept


def test_file_names_with_backslash_x_round_trip_and_never_collide(tmp_path):
    """A literal ``\\x`` crashed codecs.escape_decode; ``a\\xff`` and the byte name ``a<ff>`` were one row."""
    from db.paths import from_db, to_db

    names = [
        "plain.dcm",
        "a\\x",  # literal backslash-x, nothing after it
        "a\\x4",
        "a\\xff",  # literal text, valid UTF-8
        os.fsdecode(b"a\xff"),  # the raw byte 0xff
        os.fsdecode(b"caf\xe9 \\x41.jpeg"),
        "back\\\\slashes\\",
        "caf\u00e9.png",
    ]
    stored = []
    for name in names:
        (tmp_path / name).write_bytes(b"x")
        text = to_db(str(tmp_path / name))
        text.encode("utf-8")  # storable in any text column
        assert from_db(text) == [str(tmp_path / name)], name
        assert os.path.exists(from_db(text)[0])
        stored.append(text)
    assert len(set(stored)) == len(names)
    assert to_db("/plain/name.dcm") == "/plain/name.dcm" and from_db("/plain/name.dcm") == ["/plain/name.dcm"]


def test_migration_0004a_rewrites_old_ambiguous_paths(url, tmp_path):
    from alembic import command
    from sqlalchemy import insert, text

    from db.migrate import alembic_config
    from db.paths import from_db

    command.downgrade(alembic_config(url), "0003")
    literal = str(tmp_path / "C:\\x41 scan.dcm")  # valid UTF-8, stored literally by the old code
    (tmp_path / "C:\\x41 scan.dcm").write_bytes(b"x")
    undecodable = "/drop/caf\\xe9 \\\\x41.jpeg"  # the old escaped form of b"caf\xe9 \x41.jpeg"
    with session_scope(url) as session:
        session.execute(text("DELETE FROM source_files"))
        for n, path in enumerate([literal, undecodable, "/drop/plain.dcm"]):
            session.execute(
                insert(SourceFile).values(id=n + 1, path=path, size_bytes=1, mtime_ns=1, seen_at=utcnow())
            )
    upgrade(url)
    with session_scope(url) as session:
        rows = dict(session.execute(select(SourceFile.id, SourceFile.path)).all())
    assert from_db(rows[1]) == [literal] and rows[1] == literal.replace("\\", "\\\\")
    assert from_db(rows[2]) == [os.fsdecode(b"/drop/caf\xe9 \\x41.jpeg")] and rows[2] == undecodable
    assert rows[3] == "/drop/plain.dcm"


def test_review_takes_a_full_sha256_or_a_unique_hex_prefix(url):
    """``review '%%%%%%%%'`` marked every film reviewed: % and _ were LIKE wildcards."""
    ids = {
        sha: _register(url, f"/drop/{n}", sha)
        for n, sha in enumerate(["ab12cd34" + "0" * 56, "ab12cd34" + "1" * 56, "9" * 64])
    }
    with session_scope(url) as session:
        for hostile in ("%%%%%%%%", "________", "ab12cd3%", "ab12cd3_", "ab12cd3", "not-hex-at-all"):
            with pytest.raises(ValueError):
                queue.mark_reviewed(session, hostile, "dr-x")
        with pytest.raises(queue.AmbiguousReference, match="2 films"):
            queue.mark_reviewed(session, "AB12CD34", "dr-x")
        assert queue.mark_reviewed(session, "9" * 64, "dr-x") == 1  # full SHA-256
        assert queue.mark_reviewed(session, "ab12cd341", "dr-x") == 1  # unique prefix
        assert queue.mark_reviewed(session, "ab12cd341", "dr-x") == 0  # already reviewed
        assert queue.mark_reviewed(session, "deadbeef", "dr-x") == 0  # no such film
    with session_scope(url) as session:
        reviewed = set(session.scalars(select(Image.id).where(Image.reviewed_at.is_not(None))))
    assert reviewed == {ids["9" * 64], ids["ab12cd34" + "1" * 56]}


def test_review_command_refuses_wildcards_and_ambiguity(sqlite_url):
    import subprocess
    import sys
    from pathlib import Path

    upgrade(sqlite_url)
    for n, sha in enumerate(["ab12cd34" + "0" * 56, "ab12cd34" + "1" * 56]):
        _register(sqlite_url, f"/drop/{n}", sha)
    cli = str(Path(sys.executable).parent / "cxr-triage")
    for reference, message in (("%%%%%%%%", "hex digits"), ("ab12cd34", "2 films start with")):
        result = subprocess.run(
            [cli, "review", reference, "--database-url", sqlite_url],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    with session_scope(sqlite_url) as session:
        assert (
            session.scalar(select(func.count()).select_from(Image).where(Image.reviewed_at.is_not(None))) == 0
        )


def test_content_at_no_known_path_is_superseded_not_failed(url):
    """Item 9: the worker's "file no longer exists at any known path" is ``superseded`` via record_gone."""
    image_id = _claimed(url, "/drop/gone.dcm", "5" * 64)
    with session_scope(url) as session:
        assert queue.record_gone(session, image_id)
        assert not queue.record_gone(session, image_id)  # final: a second call changes nothing
    with session_scope(url) as session:
        image = session.get(Image, image_id)
        assert image.status == ImageStatus.SUPERSEDED and image.reason == queue.GONE_REASON
        assert queue.claim(session, [image_id], 60) == ([], [])


def test_a_batch_of_scores_is_written_as_one_film_at_a_time_would_be(url):
    """record_scores (the batch's scores in a few statements) leaves the rows record_score leaves:
    mixed attribute sets, a film already final keeps its state, a score delivered twice is one row."""
    dicom = {"modality": "CR", "view_position": "PA", "source_format": "dicom", "study_uid": "1.2.3"}
    raster = {"source_format": "png"}
    films = [
        (_claimed(url, f"/drop/{name}", name[0] * 64), attributes, 0.1 * (i + 1))
        for i, (name, attributes) in enumerate(
            [("aa.dcm", dicom), ("bb.png", raster), ("cc.jpg", None), ("dd.dcm", dicom)]
        )
    ]
    already_failed = films[3][0]
    with session_scope(url) as session:
        queue.record_problem(session, already_failed, ImageStatus.FAILED, "decoder crashed")
    batch = [(image_id, score_record(p), attributes) for image_id, attributes, p in films]
    for _ in range(2):  # the second time, as a redelivered batch would
        with session_scope(url) as session:
            queue.record_scores(session, batch)
    with session_scope(url) as session:
        states = {i: session.get(Image, i) for i, _, _ in films}
        assert [states[i].status for i, _, _ in films] == [ImageStatus.SCORED] * 3 + [ImageStatus.FAILED]
        assert states[films[0][0]].view_position == "PA" and states[films[0][0]].study_uid == "1.2.3"
        assert states[films[1][0]].source_format == "png" and states[films[1][0]].view_position is None
        assert all(states[i].finished_at is not None and states[i].lease_expires_at is None for i in states)
        assert states[already_failed].reason == "decoder crashed"
        scores = dict(session.execute(select(Score.image_id, Score.pneumonia_probability)).all())
    assert scores == pytest.approx({image_id: p for image_id, _, p in films})


def test_start_up_schema_check_knows_the_head_and_still_migrates_an_old_schema(url):
    """A command's start-up skips Alembic when the schema is current; an older one is still upgraded."""
    from alembic import command
    from alembic.script import ScriptDirectory

    from db.migrate import alembic_config, head_revision, schema_is_current

    config = alembic_config(url)
    assert head_revision() == ScriptDirectory.from_config(config).get_current_head()
    assert schema_is_current(url)
    command.downgrade(config, "0004")
    assert not schema_is_current(url)
    upgrade(url)
    assert schema_is_current(url)
    with session_scope(url) as session:  # 0005's column is back
        assert session.scalar(select(func.count(Image.study_date))) == 0


def test_a_new_database_is_not_current(tmp_path):
    from db.migrate import schema_is_current

    assert not schema_is_current(f"sqlite:///{tmp_path / 'new.db'}")


def test_registering_a_chunk_at_once(url):
    """register_many (a scan's chunk in a few statements): same content under two paths is one image,
    new only once; a replaced file's old content is superseded when no path shows it; superseded
    content seen again is queued again."""
    first = [(FileSeen("/drop/a.dcm", 10, 1), "a" * 64), (FileSeen("/drop/b.dcm", 10, 1), "b" * 64)]
    first.append((FileSeen("/drop/copy-of-a.dcm", 10, 1), "a" * 64))
    with session_scope(url) as session:
        registered = queue.register_many(session, first)
    (a, a_new), (b, b_new), (copy, copy_new) = registered
    assert a == copy != b and (a_new, b_new, copy_new) == (True, True, False)
    # b.dcm is replaced by new content; a.dcm's content now shows at b.dcm only through its copy
    second = [(FileSeen("/drop/b.dcm", 11, 2), "c" * 64), (FileSeen("/drop/d.dcm", 10, 1), "b" * 64)]
    with session_scope(url) as session:
        (c, c_new), (b_again, b_again_new) = queue.register_many(session, second)
        assert c_new and b_again == b and not b_again_new  # b's content is still at d.dcm: not superseded
        assert session.get(Image, b).status == ImageStatus.QUEUED
        session.execute(update(SourceFile).where(SourceFile.image_id == b).values(image_id=c))
        queue.supersede_if_orphaned(session, b)
        assert session.get(Image, b).status == ImageStatus.SUPERSEDED
    third = [(FileSeen("/drop/e.dcm", 10, 1), "b" * 64), (FileSeen("/drop/f.dcm", 10, 1), "b" * 64)]
    with session_scope(url) as session:
        (e, e_new), (f, f_new) = queue.register_many(session, third)
        assert e == f == b and (e_new, f_new) == (True, False)  # revived once
        assert session.get(Image, b).status == ImageStatus.QUEUED
        assert session.scalar(select(func.count()).select_from(SourceFile)) == 6
        assert queue.register_many(session, []) == []
