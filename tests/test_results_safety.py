"""Issue 25 items 1, 2 and 16 (sender part): a result never reaches the wrong patient, says whether the
film is in the model's validated population, and a film that cannot be read now is retried.

The sender is run for real against a real DICOM Storage SCP (this project's listener, which keeps what
it receives) over a socket; the Orthanc round trip of the issue's scenario is in
``tests/test_dicomnet_orthanc.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from db import outbox
from db.engine import session_scope
from db.migrate import upgrade
from db.queue import FileSeen, ScoreRecord, claim, record_score, register
from db.schema import OutboxItem, OutboxKind, OutboxStatus
from pipeline.hashing import sha256_file
from tests.dicom_factory import radiograph
from tests.test_dicomnet import RETRY, dcmtk_check, header, result
from worker.dicomnet import objects
from worker.dicomnet.listener import StorageListener
from worker.dicomnet.sender import OutboxSender, SourceGone, SourceUnreadable, read_film

DCMTK = shutil.which("dsrdump") is not None


def film(path: Path, name: str, patient: str, age: str | None = "003Y") -> Path:
    stored = np.random.default_rng(len(name)).integers(0, 4095, (64, 64)).astype(np.uint16)
    radiograph(stored, path, age=age)
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, patient, f"ACC-{patient}"
    ds.save_as(path, enforce_file_format=True)
    return path


def scored(url: str, path: Path, p: float, destination: str, *, out_of_scope: str | None = None) -> int:
    """Register, score and queue an SR for ``path`` as a scan does (the stored hash is the file's now)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    stat = path.stat()
    with session_scope(url) as session:
        image_id, _ = register(
            session, FileSeen(str(path), stat.st_size, stat.st_mtime_ns), sha256_file(path)
        )
        claim(session, [image_id], 60)
        attributes = {
            "source_format": "dicom",
            "study_uid": ds.StudyInstanceUID,
            "sop_uid": ds.SOPInstanceUID,
            "out_of_scope": out_of_scope is not None,
            "scope_note": out_of_scope,
        }
        record_score(session, image_id, ScoreRecord("model-v1", p, 0.0, None, 0.0734, 0.3826), attributes)
        plan = outbox.OutboxPlan((destination,), (OutboxKind.STRUCTURED_REPORT,))
        outbox.enqueue_results(session, image_id, "model-v1", plan, attributes)
    return image_id


@pytest.fixture
def pacs(tmp_path):
    """A real Storage SCP on a loopback port that keeps what it receives in a folder."""
    received = tmp_path / "pacs"
    scp = StorageListener(received, port=0, ae_title="PACS", host="127.0.0.1")
    port = scp.start()
    scp.received = received  # type: ignore[attr-defined]
    scp.destination = f"PACS@127.0.0.1:{port}"  # type: ignore[attr-defined]
    yield scp
    scp.stop()


def sender(url: str) -> OutboxSender:
    return OutboxSender(url, retry=RETRY, calling_ae_title="CXR_TRIAGE")


def rows(url: str) -> list[tuple[str, str | None]]:
    with session_scope(url) as session:
        return session.execute(select(OutboxItem.status, OutboxItem.last_error).order_by(OutboxItem.id)).all()


def reports(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def test_a_film_replaced_by_another_patients_film_gets_no_sr(tmp_path, pacs):
    """The issue's reproduction: A scored HIGH while the PACS is away, then B copied over A's file."""
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    drop = tmp_path / "drop"
    drop.mkdir()
    a = film(drop / "IMG0001.dcm", "Apatient^Anna", "PID-A")
    scored(url, a, 0.9966, pacs.destination)
    b = film(tmp_path / "B.dcm", "Bpatient^Bert", "PID-B")
    shutil.copy(b, a)  # the modality reuses the file name
    assert sender(url).send_due()
    ((status, error),) = rows(url)
    assert status == OutboxStatus.FAILED and "replaced" in error and "IMG0001" not in error
    assert str(drop) not in error
    assert reports(pacs.received) == []  # nothing at all reached the PACS


def test_the_sr_is_built_from_the_checked_bytes_and_a_deleted_film_gets_none(tmp_path, pacs):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    (tmp_path / "drop").mkdir()
    a = film(tmp_path / "drop" / "a.dcm", "Apatient^Anna", "PID-A")
    scored(url, a, 0.9966, pacs.destination)
    gone = film(tmp_path / "drop" / "gone.dcm", "Cpatient^Carl", "PID-C")
    scored(url, gone, 0.5, pacs.destination)
    gone.unlink()
    assert sender(url).send_due()
    statuses = rows(url)
    assert statuses[0] == (OutboxStatus.SENT, None)
    assert statuses[1][0] == OutboxStatus.FAILED and "deleted" in statuses[1][1]
    (sr,) = reports(pacs.received)
    assert str(sr.PatientName) == "Apatient^Anna" and sr.PatientID == "PID-A"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == pydicom.dcmread(a).SOPInstanceUID


def test_a_film_on_a_share_that_is_away_stays_pending_and_is_sent_when_back(tmp_path, pacs, caplog):
    """Item 16: a transient read error (here the share's folder is not there) is retried with backoff,
    not failed for good, and neither the stored reason nor the log names the file."""
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    share = tmp_path / "share"
    (share / "ward").mkdir(parents=True)
    a = film(share / "ward" / "DOE_JOHN.dcm", "Apatient^Anna", "PID-A")
    scored(url, a, 0.9, pacs.destination)
    (share / "ward").rename(tmp_path / "away")  # unmounted
    assert sender(url).send_due()
    ((status, error),) = rows(url)
    assert status == OutboxStatus.PENDING and "cannot be read now" in error and "retry" in error
    assert "DOE_JOHN" not in error and "DOE_JOHN" not in caplog.text and str(tmp_path) not in caplog.text
    with session_scope(url) as session:
        assert outbox.claim_due(session, RETRY.claim_lease_s) == []  # backing off
        session.execute(OutboxItem.__table__.update().values(next_attempt_at=None))
    (tmp_path / "away").rename(share / "ward")  # mounted again
    assert sender(url).send_due()
    assert rows(url) == [(OutboxStatus.SENT, None)]
    assert [str(sr.PatientName) for sr in reports(pacs.received)] == ["Apatient^Anna"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_a_film_without_read_permission_stays_pending(tmp_path, pacs):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    (tmp_path / "drop").mkdir()
    a = film(tmp_path / "drop" / "DOE_JOHN.dcm", "Apatient^Anna", "PID-A")
    scored(url, a, 0.9, pacs.destination)
    a.chmod(0)
    try:
        assert sender(url).send_due()
        ((status, error),) = rows(url)
        assert status == OutboxStatus.PENDING and "Permission denied" in error and "DOE_JOHN" not in error
    finally:
        a.chmod(0o600)


def test_read_film_tells_gone_from_unreachable(tmp_path):
    folder = tmp_path / "share"
    folder.mkdir()
    path = folder / "x.dcm"
    path.write_bytes(b"film A")
    good = sha256_file(path)
    assert read_film([str(path)], good) == b"film A"
    path.write_bytes(b"film B")
    with pytest.raises(SourceGone, match="replaced"):
        read_film([str(path)], good)
    path.unlink()
    with pytest.raises(SourceGone, match="deleted"):
        read_film([str(path)], good)
    shutil.rmtree(folder)  # the share is not mounted: its folder is not there
    with pytest.raises(SourceUnreadable, match="folder is not there") as raised:
        read_film([str(path)], good)
    assert str(tmp_path) not in str(raised.value)


# -- item 2: the SR says what the worklist says ------------------------------------------------------
def out_of_scope_result() -> objects.Result:
    return objects.Result(
        0.97,
        None,
        0.0734,
        0.3826,
        "ens3-test",
        "model-v1",
        calibration="site-2026",
        out_of_scope=True,
        scope_reasons=("patient age 81.0 years is outside the validated 1-5 years",),
    )


def texts(ds: pydicom.Dataset) -> dict[str, list[str]]:
    """TEXT and CODE items of the SR tree: concept code value -> values (code meanings for CODE)."""
    found: dict[str, list[str]] = {}

    def walk(items) -> None:
        for item in items:
            name = item.ConceptNameCodeSequence[0].CodeValue
            if item.ValueType == "TEXT":
                found.setdefault(name, []).append(item.TextValue)
            elif item.ValueType == "CODE":
                found.setdefault(name, []).append(item.ConceptCodeSequence[0].CodeMeaning)
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return found


def test_out_of_scope_sr_carries_scope_reasons_model_calibration_and_intended_use(tmp_path):
    src = header(film(tmp_path / "adult.dcm", "Old^Person", "PID-O", age="81"))
    sr = objects.structured_report(src, out_of_scope_result(), generate_uid())
    found = texts(sr)
    assert found["SCOPE"] == ["OUT OF SCOPE: outside the validated population"]
    assert found["SCOPE-REASON"] == ["patient age 81.0 years is outside the validated 1-5 years"]
    assert found["MODEL-VERSION"] == ["ens3-test model-v1"]
    assert "site-2026" in found["CALIBRATION"][0] and "0.3826" in found["CALIBRATION"][0]
    assert "not a diagnosis" in found["INTENDED-USE"][0]
    assert sr.SeriesDescription.startswith("OUT OF SCOPE")
    within = texts(objects.structured_report(src, result(0.97), generate_uid()))
    assert within["SCOPE"] == ["Within the validated population"] and "SCOPE-REASON" not in within
    if DCMTK:
        path = tmp_path / "sr.dcm"
        sr.save_as(path, enforce_file_format=True)
        dcmtk_check(path)
        dumped = subprocess.run(
            ["dsrdump", "+Pl", str(path)], capture_output=True, text=True, timeout=60
        ).stdout
        for shown in (
            "OUT OF SCOPE: outside the validated population",
            "patient age 81.0 years is outside the validated 1-5 years",
            "ens3-test model-v1",
            "site-2026",
            "not a diagnosis",
        ):
            assert shown in dumped, dumped


def test_sent_sr_of_an_out_of_scope_film_is_flagged(tmp_path, pacs):
    """Through the sender: the film's stored scope flag and reasons reach the PACS."""
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    (tmp_path / "drop").mkdir()
    adult = film(tmp_path / "drop" / "adult.dcm", "Old^Person", "PID-O", age="81")
    reason = "patient age 81.0 years is outside the validated 1-5 years"
    scored(url, adult, 0.97, pacs.destination, out_of_scope=reason)
    assert sender(url).send_due()
    (sr,) = reports(pacs.received)
    found = texts(sr)
    assert found["SCOPE"] == ["OUT OF SCOPE: outside the validated population"]
    assert found["SCOPE-REASON"] == [reason]
    assert "not a diagnosis" in found["INTENDED-USE"][0] and "shipped" in found["CALIBRATION"][0]


# -- item 16: operator retries ---------------------------------------------------------------------
def _three_rows(url: str, tmp_path: Path) -> tuple[int, int, outbox.Claimed]:
    """A sent row, a failed row, and a pending row that a running sender has claimed."""
    upgrade(url)
    (tmp_path / "drop").mkdir()
    for name in ("a", "b", "c"):
        scored(url, film(tmp_path / "drop" / f"{name}.dcm", name, name), 0.5, "PACS@127.0.0.1:104")
    with session_scope(url) as session:
        sent, failed, held = outbox.claim_due(session, RETRY.claim_lease_s)
        outbox.mark_sent(session, sent)
        outbox.mark_retry(session, failed, "refused", RETRY, permanent=True)
    return sent.id, failed.id, held


def test_retry_by_id_refuses_a_sent_row_without_sent(tmp_path):
    from tests.conftest import CLI

    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    sent_id, failed_id, _ = _three_rows(url, tmp_path)

    def retry(*args: str) -> subprocess.CompletedProcess:
        command = [CLI, "outbox", "retry", *args, "--database-url", url]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    refused = retry(str(sent_id))
    assert refused.returncode == 1 and "already sent; add --sent" in refused.stderr
    assert [s for s, _ in rows(url)] == ["sent", "failed", "pending"]
    again = retry(str(sent_id), "--sent")
    assert again.returncode == 0 and "1 row(s) queued again" in again.stderr
    assert [s for s, _ in rows(url)] == ["pending", "failed", "pending"]
    assert retry(str(failed_id)).returncode == 0


def test_retry_sent_without_ids_leaves_a_claimed_row_to_its_sender(tmp_path):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    _, _, held = _three_rows(url, tmp_path)
    with session_scope(url) as session:
        done = outbox.retry(session, include_sent=True)
        assert done.queued == 2
        # the running sender's claim stands: nobody else can take the row, its answer still counts
        assert held.id not in [c.id for c in outbox.claim_due(session, RETRY.claim_lease_s)]
    with session_scope(url) as session:
        assert outbox.mark_sent(session, held)
        assert session.get(OutboxItem, held.id).status == OutboxStatus.SENT


# -- item 4: one SOP instance is one film ----------------------------------------------------------
def test_the_same_instance_sent_twice_in_two_syntaxes_is_one_file(tmp_path):
    from pydicom.uid import RLELossless

    from tests.test_dicomnet import _send

    scp = StorageListener(tmp_path / "drop", port=0, ae_title="CXR_TRIAGE", host="127.0.0.1")
    port = scp.start()
    try:
        stored = np.random.default_rng(3).integers(0, 4095, (64, 64)).astype(np.uint16)
        first = pydicom.dcmread(radiograph(stored, tmp_path / "first.dcm"))
        again = pydicom.dcmread(radiograph(stored, tmp_path / "again.dcm", syntax=RLELossless))
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            setattr(again, keyword, first[keyword].value)
        again.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
        assert _send(port, [first]) == [0] and _send(port, [again]) == [0]  # both answered success
    finally:
        scp.stop()
    (kept,) = (tmp_path / "drop").iterdir()
    assert pydicom.dcmread(kept).file_meta.TransferSyntaxUID == first.file_meta.TransferSyntaxUID


def test_a_later_copy_of_a_scored_instance_is_a_duplicate_with_no_second_result(tmp_path):
    """Two contents (two transfer syntaxes), one SOP Instance UID: one ranked film, one SR."""
    from db.queue import record_scores
    from db.schema import Image

    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    plan = outbox.OutboxPlan(("PACS@127.0.0.1:104",), (OutboxKind.STRUCTURED_REPORT,))
    attributes = {"source_format": "dicom", "study_uid": "1.2.3", "sop_uid": "1.2.3.4"}
    ids = []
    for n, sha in enumerate(
        ("a" * 64, "b" * 64, "c" * 64)
    ):  # the third comes in the same batch as the second
        with session_scope(url) as session:
            image_id, _ = register(session, FileSeen(f"/drop/{n}.dcm", 1, 1), sha)
            ids.append(image_id)
    record = ScoreRecord("model-v1", 0.9, 2.0, None, 0.0734, 0.3826)
    for batch in ([ids[0]], ids[1:]):
        with session_scope(url) as session:
            claim(session, batch, 60)
            duplicates = record_scores(session, [(i, record, attributes) for i in batch])
            for image_id in batch:
                outbox.enqueue_results(session, image_id, "model-v1", plan, attributes)
    assert duplicates == ids[1:]
    with session_scope(url) as session:
        states = session.execute(select(Image.status, Image.reason).order_by(Image.id)).all()
        assert [s for s, _ in states] == ["scored", "rejected", "rejected"]
        assert "duplicate of film aaaaaaaaaaaa" in states[1][1]
        assert session.execute(select(OutboxItem.image_id)).scalars().all() == [ids[0]]


def test_outbox_is_keyed_by_the_sop_instance_even_for_two_scored_copies(tmp_path):
    """Whatever the images' states (e.g. two copies scored at once by two workers): one SR."""
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    plan = outbox.OutboxPlan(("PACS@127.0.0.1:104",), (OutboxKind.STRUCTURED_REPORT,))
    attributes = {"source_format": "dicom", "study_uid": "1.2.3", "sop_uid": "1.2.3.4"}
    made = []
    for n, sha in enumerate(("a" * 64, "b" * 64)):
        with session_scope(url) as session:
            image_id, _ = register(session, FileSeen(f"/drop/{n}.dcm", 1, 1), sha)
            claim(session, [image_id], 60)
            record_score(session, image_id, ScoreRecord("model-v1", 0.9, 2.0, None, 0.07, 0.38), attributes)
            made.append(outbox.enqueue_results(session, image_id, "model-v1", plan, attributes))
    assert made == [1, 0]


def test_scan_of_one_instance_in_two_syntaxes_ranks_one_film_and_sends_one_sr(tmp_path, pacs, kermany):
    """The issue's reproduction of item 4, through a real scan: one worklist film, one SR."""
    from PIL import Image as PilImage
    from pydicom.uid import RLELossless

    from tests.conftest import CLI, kermany_files

    with PilImage.open(kermany_files(kermany, "PNEUMONIA", 1)[0]) as image:
        stored = (np.asarray(image.convert("L"), dtype=np.uint16) * 16).astype(np.uint16)
    folder = tmp_path / "films"
    folder.mkdir()
    first = pydicom.dcmread(radiograph(stored, folder / "explicit.dcm", modality="CR", view="PA"))
    again = pydicom.dcmread(
        radiograph(stored, tmp_path / "rle.dcm", modality="CR", view="PA", syntax=RLELossless)
    )
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(again, keyword, first[keyword].value)
    again.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    again.save_as(folder / "rle.dcm", enforce_file_format=True)
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    done = subprocess.run(
        [
            CLI,
            "scan",
            str(folder),
            "--database-url",
            url,
            "--no-progress",
            "--send-results",
            pacs.destination,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, CXR_TRIAGE_DECODE_WORKERS="0"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "1 scored, 1 rejected" in done.stderr and "results: 1 sent, 0 failed, 0 pending" in done.stderr
    listed = subprocess.run(
        [CLI, "worklist", "--format", "json", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    rows = json.loads(listed.stdout)
    assert sorted(r["status"] for r in rows) == ["rejected", "scored"]
    assert "duplicate of film" in next(r["reason"] for r in rows if r["status"] == "rejected")
    (sr,) = reports(pacs.received)
    assert (
        sr.CurrentRequestedProcedureEvidenceSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == first.SOPInstanceUID
    )


def test_a_reason_quoting_a_path_is_scrubbed_in_the_row_and_the_log(tmp_path, caplog):
    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    (tmp_path / "drop").mkdir()
    scored(url, film(tmp_path / "drop" / "a.dcm", "a", "a"), 0.5, "PACS@127.0.0.1:104")
    with session_scope(url) as session:
        (item,) = outbox.claim_due(session, RETRY.claim_lease_s)
    quoted = "could not build the object: OSError: [Errno 5] Input/output error: '/srv/drop/DOE_JOHN.dcm'"
    sender(url)._finish(item, quoted, permanent=True)
    ((status, error),) = rows(url)
    assert status == OutboxStatus.FAILED and "Input/output error" in error
    assert "DOE_JOHN" not in error and "DOE_JOHN" not in caplog.text and "/srv/drop" not in caplog.text


def test_the_sr_reports_the_calibration_in_force_as_the_worklist_does(tmp_path, pacs):
    """A site calibration (thresholds and temperature) is active: the SR's probability, thresholds and
    category are the worklist's, and it names the calibration."""
    import math

    from db.schema import Calibration, Score
    from tests.conftest import CLI
    from tests.test_dicomnet import numeric_values

    url = f"sqlite:///{tmp_path / 'w.sqlite3'}"
    upgrade(url)
    (tmp_path / "drop").mkdir()
    path = film(tmp_path / "drop" / "a.dcm", "Apatient^Anna", "PID-A")
    image_id = scored(url, path, 0.5, pacs.destination)
    logit = 2.0
    with session_scope(url) as session:  # the stored score gets a logit; a site calibration is activated
        score = session.scalars(select(Score).where(Score.image_id == image_id)).one()
        score.pneumonia_logit, score.pneumonia_probability = logit, 1 / (1 + math.exp(-logit))
        session.add(
            Calibration(
                name="site-2026",
                model_version="model-v1",
                screening_threshold=0.2,
                high_confidence_threshold=0.7,
                temperature=2.0,
                active=True,
                source="labels",
            )
        )
    assert sender(url).send_due()
    (sr,) = reports(pacs.received)
    calibrated = 1 / (1 + math.exp(-logit / 2.0))
    values = numeric_values(sr)
    assert values["PNEUMONIA-P"] == pytest.approx(calibrated)
    assert (values["SCREEN-T"], values["HIGH-T"]) == (0.2, 0.7)
    found = texts(sr)
    assert found["TRIAGE"] == ["High confidence pneumonia"]  # 0.731 >= 0.7 (uncalibrated 0.88 too)
    assert "site-2026" in found["CALIBRATION"][0]
    url_rows = subprocess.run(
        [CLI, "worklist", "--format", "json", "--database-url", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    (row,) = json.loads(url_rows.stdout)
    assert row["calibration"] == "site-2026" and row["score"] == pytest.approx(calibrated, abs=1e-4)
