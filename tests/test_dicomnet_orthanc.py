"""Round trips against a real PACS: Debian's Orthanc, started on loopback ports with a temporary config.

modality (pynetdicom SCU) or Orthanc -> ``cxr-triage dicom-listen`` -> drop folder -> ``cxr-triage
watch --send-results`` -> SR back in Orthanc, in the film's study, read back over Orthanc's REST API.
The scoring part is kept to a few films (the CI machine is small and shared).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from sqlalchemy import select

from db.engine import session_scope
from db.migrate import upgrade
from db.schema import Image, OutboxItem, Score
from tests.conftest import CLI, kermany_files
from tests.dicom_factory import radiograph
from tests.orthanc import Orthanc, available
from tests.ports import free_port
from tests.test_dicomnet import dcmtk_check, numeric_values, sparse_film

# In CI (.ci/run installs orthanc and dcmtk) a missing binary is a failure, not a skip.
pytestmark = pytest.mark.skipif(
    not available() and not os.environ.get("CI"), reason="Orthanc (Debian package orthanc) is not installed"
)

REAL_CHEST = [
    "siim-acr-pneumothorax__mlmed-torchxrayvision/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm",
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_J2KI.dcm",
]
NOT_A_CHEST_FILM = "edge-cases__pydicom-testfiles/CT_small.dcm"


class Cli:
    """A cxr-triage command running as a real process, its output in a log file."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.log = tmp / f"{name}.log"
        environ = dict(os.environ, CXR_TRIAGE_DECODE_WORKERS="0", CXR_TRIAGE_LOG_LEVEL="INFO")
        self.process = subprocess.Popen(
            [CLI, *args], stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=environ
        )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def wait_for(what: str, check: Callable[[], bool], timeout: float, *processes: Cli) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for cli in processes:
            assert cli.process.poll() is None, f"{cli.log.name} exited:\n{cli.output()[-3000:]}"
        time.sleep(0.5)
    logs = "\n".join(f"--- {c.log.name}\n{c.output()[-3000:]}" for c in processes)
    pytest.fail(f"timed out waiting for {what}\n{logs}")


def wait_listening(port: int, cli: Cli) -> None:
    def echo_ok() -> bool:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.2.840.10008.1.1")
        ae.acse_timeout = 2
        assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
        if not assoc.is_established:
            return False
        assoc.release()
        return True

    wait_for("dicom-listen to answer C-ECHO", echo_ok, 60, cli)


def c_store(port: int, datasets: list[pydicom.Dataset], calling: str = "MODALITY") -> list[int]:
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    assert assoc.is_established
    try:
        return [assoc.send_c_store(ds).Status for ds in datasets]
    finally:
        assoc.release()


def final_images(url: str) -> dict[str, tuple[str, str | None, float | None]]:
    """sop_uid -> (status, study_uid, stored score) for every final image."""
    with session_scope(url) as session:
        rows = session.execute(
            select(Image.sop_uid, Image.status, Image.study_uid, Score.pneumonia_probability)
            .outerjoin(Score, Score.image_id == Image.id)
            .where(Image.status.in_(["scored", "rejected", "failed"]))
        ).all()
    return {row[0] or f"?{n}": (row[1], row[2], row[3]) for n, row in enumerate(rows)}


def outbox_statuses(url: str) -> list[str]:
    with session_scope(url) as session:
        return list(session.scalars(select(OutboxItem.status)))


def srs_in_study(orthanc: Orthanc, study_uid: str) -> list[pydicom.Dataset]:
    found = []
    for instance in orthanc.instances_of_study(study_uid):
        ds = pydicom.dcmread(io.BytesIO(orthanc.instance_file(instance["ID"])))
        if ds.Modality == "SR":
            found.append(ds)
    return found


def assert_sr_matches(orthanc: Orthanc, sop_uid: str, study_uid: str, score: float) -> pydicom.Dataset:
    (sr,) = srs_in_study(orthanc, study_uid)  # exactly one: no duplicates
    assert sr.StudyInstanceUID == study_uid
    assert numeric_values(sr)["PNEUMONIA-P"] == score  # FloatingPointValue: the stored double, exactly
    referenced = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert referenced.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == sop_uid
    import highdicom as hd

    hd.sr.ComprehensiveSR.from_dataset(sr)  # highdicom parses it back
    if shutil.which("dsrdump"):  # dcmtk (and dicom3tools' dciodvfy where installed) accept it
        out = Path(tempfile.mkdtemp()) / "sr.dcm"
        sr.save_as(out, enforce_file_format=True)
        dcmtk_check(out)
        shutil.rmtree(out.parent)
    return sr


def sr_count(orthanc: Orthanc) -> int:
    return sum(
        1 for i in orthanc.instances() if i["MainDicomTags"].get("SOPInstanceUID") and _is_sr(orthanc, i)
    )


def _is_sr(orthanc: Orthanc, instance: dict) -> bool:
    series = orthanc.get(f"/series/{instance['ParentSeries']}").json()
    return series["MainDicomTags"].get("Modality") == "SR"


@pytest.fixture
def film_factory(tmp_path, kermany):
    """Real chest pixels (a Kermany film per call, 12-bit) in a synthetic CR header: noise would be
    rejected by the out-of-distribution guard, as it should be."""
    from PIL import Image

    films = iter(kermany_files(kermany, "PNEUMONIA", 16) + kermany_files(kermany, "NORMAL", 16))

    def pixels() -> np.ndarray:
        with Image.open(next(films)) as image:
            grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return (grey * 4095).astype(np.uint16)

    def make(name: str) -> Path:
        return radiograph(pixels(), tmp_path / "made" / name, modality="CR", view="PA")

    make.pixels = pixels  # type: ignore[attr-defined]

    (tmp_path / "made").mkdir()
    return make


@pytest.mark.extended  # real files of ../shared/data/dicom with no stand-in in a bare clone
def test_round_trip_modality_and_pacs_push_to_sr_in_orthanc(tmp_path, dicom_dir, film_factory):
    listen_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"cxr": ("CXR_TRIAGE", listen_port)}).start()
    drop, url = tmp_path / "drop", f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    listen = Cli(
        tmp_path,
        "listen",
        "dicom-listen",
        str(drop),
        "--port",
        str(listen_port),
        "--bind",
        "127.0.0.1",
        "--allowed-callers",
        "MODALITY,ORTHANC",
    )
    watch = Cli(
        tmp_path,
        "watch",
        "watch",
        str(drop),
        "--database-url",
        url,
        "--batch-wait",
        "0.2",
        "--send-results",
        orthanc.destination,
    )
    try:
        wait_listening(listen_port, listen)
        films = [pydicom.dcmread(dicom_dir / name) for name in [*REAL_CHEST, NOT_A_CHEST_FILM]]
        assert c_store(listen_port, films) == [0, 0, 0]
        # Orthanc pushes a film it holds to dicom-listen (its modality store, as a PACS routing rule would)
        pushed = pydicom.dcmread(film_factory("pushed.dcm"))
        orthanc_id = orthanc.upload((tmp_path / "made" / "pushed.dcm").read_bytes())
        answer = orthanc.post(
            "/modalities/cxr/store", {"Resources": [orthanc_id], "Synchronous": True}
        ).json()
        assert answer.get("FailedInstancesCount", 0) == 0, answer
        wait_for("every film to be final", lambda: len(final_images(url)) == 4, 300, watch, listen)
        wait_for("the outbox to drain", lambda: set(outbox_statuses(url)) == {"sent"}, 120, watch)
        images = final_images(url)
        scored = {uid: v for uid, v in images.items() if v[0] == "scored"}
        assert set(scored) == {films[0].SOPInstanceUID, films[1].SOPInstanceUID, pushed.SOPInstanceUID}
        for sop_uid, (_, study_uid, score) in scored.items():
            assert_sr_matches(orthanc, sop_uid, study_uid, score)
        assert [v[0] for uid, v in images.items() if uid not in scored] == ["rejected"]  # the CT
        assert srs_in_study(orthanc, films[2].StudyInstanceUID) == []  # nothing for a rejected file
        assert len(outbox_statuses(url)) == 3
    finally:
        watch.stop()
        listen.stop()
        orthanc.stop()
    logged = watch.output() + listen.output()
    assert "Testperson" not in logged  # no patient identifiers in logs, nor UIDs
    identifiers = [
        str(ds.get(keyword) or "")
        for ds in [*films, pushed]
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "PatientName", "PatientID", "AccessionNumber")
    ]
    assert not [value for value in identifiers if len(value) > 3 and value in logged]


def _pending_with_errors(url: str, pending: int, sent: int) -> Callable[[], bool]:
    """True once the outbox holds ``sent`` sent rows and ``pending`` rows that failed at least once."""

    def check() -> bool:
        with session_scope(url) as session:
            rows = session.execute(select(OutboxItem.status, OutboxItem.last_error)).all()
        retried = [e for s, e in rows if s == "pending" and e]
        return (
            sorted(s for s, _ in rows) == ["pending"] * pending + ["sent"] * sent and len(retried) == pending
        )

    return check


def test_orthanc_down_mid_run_outbox_delivers_once_when_back(tmp_path, film_factory):
    """Stop the PACS mid-run: results wait in the outbox and go when it is back, once each; results left
    pending by a watch that stopped are sent by the next one. Sparse films (no type 2 attributes, no
    file meta) get a valid SR."""
    orthanc = Orthanc(tmp_path / "orthanc").start()
    drop, url = tmp_path / "drop", f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    drop.mkdir()
    upgrade(url)  # so that the test can read the outbox before watch has started
    args = ("watch", str(drop), "--database-url", url, "--batch-wait", "0.2")
    args += ("--send-results", orthanc.destination)
    watch = Cli(tmp_path, "watch", *args)
    restarted = None
    try:
        shutil.copy(film_factory("first.dcm"), drop / "first.dcm")
        wait_for("the first SR", lambda: outbox_statuses(url) == ["sent"], 300, watch)
        orthanc.stop()
        shutil.copy(film_factory("second.dcm"), drop / "second.dcm")
        sparse = sparse_film(tmp_path / "made", "sparse.dcm", stored=film_factory.pixels())
        assert sparse.read_bytes()[128:132] != b"DICM"  # no preamble, no file meta
        shutil.copy(sparse, drop / "sparse.dcm")
        wait_for("retries while Orthanc is down", _pending_with_errors(url, 2, 1), 300, watch)
        orthanc.start()
        wait_for("delivery once Orthanc is back", lambda: outbox_statuses(url) == ["sent"] * 3, 120, watch)
        # down again, and the watch stops with a result pending: the next watch sends it
        orthanc.stop()
        shutil.copy(film_factory("third.dcm"), drop / "third.dcm")
        wait_for("a retry of the third", _pending_with_errors(url, 1, 3), 300, watch)
        assert watch.stop() == 0
        orthanc.start()
        restarted = Cli(tmp_path, "watch-again", *args)
        wait_for("delivery by the next watch", lambda: outbox_statuses(url) == ["sent"] * 4, 300, restarted)
        time.sleep(3)  # a few more sender rounds: nothing is sent twice
        restarted.stop()
        images = final_images(url)
        assert sorted(v[0] for v in images.values()) == ["scored"] * 4
        sparse_seen = False
        for sop_uid, (_, study_uid, score) in images.items():
            sr = assert_sr_matches(orthanc, sop_uid, study_uid, score)  # one each, valid for dcmtk
            sparse_seen = sparse_seen or sr.PatientBirthDate == ""
        assert sr_count(orthanc) == 4
        assert sparse_seen, "the sparse film's SR has an empty PatientBirthDate"
    finally:
        watch.stop()
        if restarted is not None:
            restarted.stop()
        orthanc.stop()


def test_scan_sends_sr_heatmap_and_key_object_before_it_exits(tmp_path, film_factory):
    orthanc = Orthanc(tmp_path / "orthanc").start()
    url = f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    folder = tmp_path / "made"
    film = film_factory("scan.dcm")
    command = [CLI, "scan", str(folder), "--database-url", url, "--no-progress"]
    command += ["--send-results", orthanc.destination, "--send-heatmap", "--send-key-object"]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=600,
            env=dict(os.environ, CXR_TRIAGE_DECODE_WORKERS="0"),
        )
        assert done.returncode == 0, done.stderr[-3000:]
        ds = pydicom.dcmread(film)
        (_, study_uid, score) = final_images(url)[ds.SOPInstanceUID]
        assert_sr_matches(orthanc, ds.SOPInstanceUID, study_uid, score)
        with session_scope(url) as session:
            high = session.scalar(select(Score.high_confidence_positive))
        returned = [
            pydicom.dcmread(io.BytesIO(orthanc.instance_file(i["ID"])))
            for i in orthanc.instances_of_study(study_uid)
        ]
        by_class = {r.SOPClassUID.name: r for r in returned}
        capture = by_class["Secondary Capture Image Storage"]
        assert capture.BurnedInAnnotation == "YES" and capture.SamplesPerPixel == 3
        assert capture.pixel_array.shape[:2] == (ds.Rows, ds.Columns)  # the film at its own size
        assert ("Key Object Selection Document Storage" in by_class) == bool(high)  # KOS for HIGH films only
        listed = subprocess.run(
            [CLI, "outbox", "list", "--database-url", url, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert listed.stdout.count('"status": "sent"') == (3 if high else 2), listed.stdout
    finally:
        orthanc.stop()


def test_bad_destination_is_a_clear_error(tmp_path):
    done = subprocess.run(
        [
            CLI,
            "scan",
            str(tmp_path),
            "--database-url",
            f"sqlite:///{tmp_path / 'w.sqlite3'}",
            "--send-results",
            "pacs.example.org:104",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "AET@host:port" in done.stderr and "Traceback" not in done.stderr


def test_distributed_workers_create_rows_and_the_supervisor_sends(pg_url, redis_url, tmp_path, film_factory):
    """`worker --send-results`: Celery children write the outbox rows, the supervisor sends them."""
    orthanc = Orthanc(tmp_path / "orthanc").start()
    env = dict(
        os.environ,
        CXR_TRIAGE_DATABASE_URL=pg_url,
        CXR_TRIAGE_BROKER_URL=redis_url,
        CXR_TRIAGE_DECODE_WORKERS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("CXR_TRIAGE_RESULTS_DESTINATION", None)
    subprocess.run([CLI, "db", "upgrade"], env=env, check=True, capture_output=True, timeout=120)
    log = tmp_path / "worker.log"
    worker = subprocess.Popen(
        [CLI, "worker", "--processes", "1", "--send-results", orthanc.destination],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    film = pydicom.dcmread(film_factory("distributed.dcm"))
    try:
        done = subprocess.run(
            [CLI, "scan", str(tmp_path / "made"), "--wait", "--no-progress"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]

        def sent() -> bool:
            return outbox_statuses(pg_url) == ["sent"]

        deadline = time.monotonic() + 120
        while not sent() and time.monotonic() < deadline:
            assert worker.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        assert sent(), log.read_text()[-3000:]
        (_, study_uid, score) = final_images(pg_url)[film.SOPInstanceUID]
        assert_sr_matches(orthanc, film.SOPInstanceUID, study_uid, score)
    finally:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
        orthanc.stop()


def _as_patient(path: Path, name: str, patient_id: str, **values: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(path)
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, patient_id, f"ACC-{patient_id}"
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return ds


def test_a_film_replaced_while_the_pacs_was_down_never_reaches_the_pacs_as_the_other_patient(
    tmp_path, film_factory
):
    """Issue 25 item 1, the reproduction: A is scored while the PACS is down, B (an adult: out of
    scope, item 2) is copied over A's file name, the PACS comes back and the folder is scanned again.
    Only B's own SR arrives, with B's score and B's scope flag; A's result fails with a reason."""
    from tests.test_results_safety import texts

    orthanc = Orthanc(tmp_path / "orthanc")  # its ports are chosen; it is not started yet
    drop, url = tmp_path / "drop", f"sqlite:///{tmp_path / 'worklist.sqlite3'}"
    drop.mkdir()
    a = _as_patient(film_factory("A.dcm"), "Apatient^Anna", "PID-A")
    b = _as_patient(film_factory("B.dcm"), "Bpatient^Bert", "PID-B", PatientAge="81")
    shutil.copy(tmp_path / "made" / "A.dcm", drop / "IMG0001.dcm")
    command = [CLI, "scan", str(drop), "--database-url", url, "--no-progress"]
    command += ["--send-results", orthanc.destination]
    env = dict(os.environ, CXR_TRIAGE_DECODE_WORKERS="0")
    try:
        first = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert first.returncode == 3, first.stderr[-3000:]  # scored, result not delivered
        assert "results: 0 sent, 0 failed, 1 pending" in first.stderr
        shutil.copy(tmp_path / "made" / "B.dcm", drop / "IMG0001.dcm")  # the file name is reused
        orthanc.start()
        summary = tmp_path / "summary.json"
        again = subprocess.run(
            [*command, "--summary-json", str(summary)], capture_output=True, text=True, timeout=600, env=env
        )
        assert again.returncode == 3, again.stderr[-3000:]  # A's result failed: said, not hidden
        assert "results: 1 sent, 1 failed, 0 pending" in again.stderr
        record = json.loads(summary.read_text())
        assert (record["results_sent"], record["results_failed"], record["results_pending"]) == (1, 1, 0)
        with session_scope(url) as session:
            errors = dict(session.execute(select(Image.sop_uid, OutboxItem.last_error).join(Image)).all())
        assert "replaced" in errors[a.SOPInstanceUID] and "IMG0001" not in errors[a.SOPInstanceUID]
        assert srs_in_study(orthanc, a.StudyInstanceUID) == []
        (_, study_uid, b_score) = final_images(url)[b.SOPInstanceUID]
        sr = assert_sr_matches(orthanc, b.SOPInstanceUID, study_uid, b_score)  # B's own, exactly one
        assert (str(sr.PatientName), sr.PatientID, sr.AccessionNumber) == (
            "Bpatient^Bert",
            "PID-B",
            "ACC-PID-B",
        )
        assert sr_count(orthanc) == 1  # nothing else reached the PACS
        found = texts(sr)
        assert found["SCOPE"] == ["OUT OF SCOPE: outside the validated population"]
        assert any("81.0 years" in reason for reason in found["SCOPE-REASON"])
        assert "not a diagnosis" in found["INTENDED-USE"][0]
    finally:
        orthanc.stop()
