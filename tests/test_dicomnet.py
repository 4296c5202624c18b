"""DICOM in and out without a PACS: outbox transitions, SR/SC/KOS objects, the Storage SCP.

The objects are checked with dcmtk (``dsrdump``, ``dcmdump``; ``dciodvfy`` where installed) and
the listener with a real pynetdicom SCU over loopback. Orthanc round trips: test_dicomnet_orthanc.py.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from datetime import timedelta
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from db import outbox
from db.engine import session_scope
from db.queue import FileSeen, ScoreRecord, claim, record_score, register
from db.schema import OutboxItem, OutboxKind, OutboxStatus
from tests.dicom_factory import radiograph
from worker.dicomnet import objects
from worker.dicomnet.listener import StorageListener
from worker.dicomnet.plan import Destination, DestinationError, results_plan
from worker.dicomnet.sender import retry_policy
from worker.settings import Settings

SPARSE_DROPS = (
    "PatientBirthDate",
    "PatientSex",
    "PatientOrientation",
    "ReferringPhysicianName",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "PatientID",
    "PatientName",
)
RETRY = retry_policy(Settings.build())  # the shipped defaults, as the sender gets them
PLAN = outbox.OutboxPlan(("PACS@127.0.0.1:104",), (OutboxKind.STRUCTURED_REPORT, OutboxKind.KEY_OBJECT))
DCMTK = shutil.which("dsrdump") is not None


def sparse_film(
    folder: Path, name: str = "sparse.dcm", size: int = 64, stored: np.ndarray | None = None, **kwargs
) -> Path:
    """A factory film without the type 2 attributes real sparse films lack, and without file meta.

    ``stored``: the pixels (default: noise, enough for building DICOM objects; a film that must be
    scored needs real chest pixels, or the out-of-distribution guard rejects it)."""
    if stored is None:
        stored = np.random.default_rng(7).integers(0, 4095, (size, size))
    path = radiograph(stored, folder / name, modality="DX", **kwargs)
    ds = pydicom.dcmread(path)
    for keyword in SPARSE_DROPS:
        ds.pop(keyword, None)
    ds.file_meta = FileMetaDataset()  # no File Meta Information, no preamble: a raw data set
    ds.preamble = None
    ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    return path


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True, force=True)


def result(p: float = 0.61, viral: float | None = 0.25) -> objects.Result:
    return objects.Result(p, viral, 0.0734, 0.3826, "ens3-test", "model-v1")


def numeric_values(ds: pydicom.Dataset) -> dict[str, float]:
    """Every NUM item in the SR tree, by concept code value (FloatingPointValue when present)."""
    values: dict[str, float] = {}

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "NUM":
                measured = item.MeasuredValueSequence[0]
                value = measured.get("FloatingPointValue", measured.NumericValue)
                values[item.ConceptNameCodeSequence[0].CodeValue] = float(value)
            walk(item.get("ContentSequence", []))

    walk(ds.ContentSequence)
    return values


def dcmtk_check(path: Path) -> None:
    """dsrdump must read the SR without errors; dciodvfy (dicom3tools) where it is installed."""
    done = subprocess.run(["dsrdump", "-Ec", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "E:" not in done.stderr, done.stderr
    if shutil.which("dciodvfy"):
        checked = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert "Error" not in checked.stderr, checked.stderr


# -- objects ---------------------------------------------------------------------------------------
def test_sr_from_sparse_source_is_valid_and_holds_the_result(tmp_path):
    source = sparse_film(tmp_path)
    src = header(source)
    assert "PatientBirthDate" not in src and not getattr(src, "file_meta", None)
    assert source.read_bytes()[128:132] != b"DICM"
    uid = generate_uid()
    sr = objects.structured_report(src, result(), uid)
    out = tmp_path / "sr.dcm"
    sr.save_as(out, enforce_file_format=True)
    back = pydicom.dcmread(out)
    assert back.StudyInstanceUID == src.StudyInstanceUID
    assert back.SeriesInstanceUID != src.SeriesInstanceUID and back.SOPInstanceUID == uid
    assert back.PatientBirthDate == "" and back.AccessionNumber == ""
    values = numeric_values(back)
    assert values["PNEUMONIA-P"] == pytest.approx(0.61, abs=0)
    assert values["SCREEN-T"] == 0.0734 and values["HIGH-T"] == 0.3826 and values["VIRAL-P"] == 0.25
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    parsed = hd.sr.ComprehensiveSR.from_dataset(back)
    group = parsed.content.get_planar_roi_measurement_groups() + parsed.content.get_image_measurement_groups()
    assert group, "highdicom finds the TID 1501 measurement group"
    assert group[0].get_qualitative_evaluations()[0].value.value == "HIGH"
    if DCMTK:
        dcmtk_check(out)


def test_sr_tier_follows_the_thresholds_given(tmp_path):
    src = header(sparse_film(tmp_path))
    for p, tier in ((0.01, "BELOW"), (0.2, "SCREEN"), (0.9, "HIGH")):
        sr = objects.structured_report(src, result(p, viral=None), generate_uid())
        codes = [
            i.ConceptCodeSequence[0].CodeValue
            for i in sr.ContentSequence[-1].ContentSequence[0].ContentSequence
            if i.ValueType == "CODE" and i.ConceptNameCodeSequence[0].CodeValue == "TRIAGE"
        ]
        assert codes == [tier]


def test_source_without_study_is_refused(tmp_path):
    src = header(sparse_film(tmp_path))
    del src.StudyInstanceUID
    with pytest.raises(objects.SourceProblem):
        objects.structured_report(src, result(), generate_uid())


@pytest.mark.skipif(not DCMTK, reason="dcmtk is not installed")
def test_key_object_and_secondary_capture_are_valid(tmp_path):
    src = header(sparse_film(tmp_path))
    ko = objects.key_object(src, result(0.9), generate_uid())
    ko.save_as(tmp_path / "ko.dcm", enforce_file_format=True)
    dcmtk_check(tmp_path / "ko.dcm")
    grey = np.linspace(0, 1, 128 * 128, dtype=np.float32).reshape(128, 128)
    sc = objects.secondary_capture(
        src, objects.overlay_rgb(grey, np.eye(8, dtype=np.float32)), generate_uid()
    )
    sc.save_as(tmp_path / "sc.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "sc.dcm")
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.BurnedInAnnotation == "YES"
    assert back.pixel_array.shape == (128, 128, 3)
    assert back.pixel_array[:4].max() < 40 or back.pixel_array[:4].mean() < 80  # the black label band
    dumped = subprocess.run(["dcmdump", str(tmp_path / "sc.dcm")], capture_output=True, text=True, timeout=60)
    assert dumped.returncode == 0 and "E:" not in dumped.stderr
    if shutil.which("dciodvfy"):
        checked = subprocess.run(["dciodvfy", str(tmp_path / "sc.dcm")], capture_output=True, text=True)
        assert "Error" not in checked.stderr, checked.stderr


# -- outbox ----------------------------------------------------------------------------------------
def _scored(url: str, p: float, name: str, source_format: str = "dicom") -> int:
    with session_scope(url) as session:
        image_id, _ = register(session, FileSeen(f"/nowhere/{name}", 1, 1), name.ljust(64, "0"))
        claim(session, [image_id], 60)
        record_score(
            session,
            image_id,
            ScoreRecord("model-v1", p, 0.0, None, 0.0734, 0.3826),
            {"source_format": source_format, "study_uid": "1.2.3" if source_format == "dicom" else None},
        )
        outbox.enqueue_results(
            session, image_id, "model-v1", PLAN, {"source_format": source_format, "study_uid": "1.2.3"}
        )
    return image_id


def test_outbox_enqueue_is_idempotent_and_dicom_only(url):
    high = _scored(url, 0.9, "a")
    low = _scored(url, 0.01, "b")
    _scored(url, 0.9, "c", source_format="png")
    with session_scope(url) as session:
        assert outbox.enqueue_results(session, high, "model-v1", PLAN, {"source_format": "dicom"}) == 0
        rows = session.query(OutboxItem.image_id, OutboxItem.kind).order_by(OutboxItem.id).all()
    assert sorted(rows) == sorted([(high, "sr"), (high, "ko"), (low, "sr")])  # KOS for HIGH only


def test_outbox_claim_backoff_sent_once_and_operator_retry(url):
    image_id = _scored(url, 0.9, "a")
    with session_scope(url) as session:
        first = outbox.claim_due(session, RETRY.claim_lease_s)
        assert {c.image_id for c in first} == {image_id} and len(first) == 2
        assert outbox.claim_due(session, RETRY.claim_lease_s) == []  # claimed: not due for anyone else
        assert outbox.mark_retry(session, first[0], "destination unreachable", RETRY) is OutboxStatus.PENDING
        assert outbox.mark_sent(session, first[1])
        assert not outbox.mark_sent(session, first[1])  # a second sender's late answer changes nothing
        row = session.get(OutboxItem, first[0].id)
        delay = row.next_attempt_at.replace(tzinfo=None) - row.created_at.replace(tzinfo=None)
        assert delay >= timedelta(seconds=RETRY.first_retry_s * 0.9)
        assert outbox.claim_due(session, RETRY.claim_lease_s) == []  # backing off
        row.next_attempt_at = row.created_at
    with session_scope(url) as session:
        again = outbox.claim_due(session, RETRY.claim_lease_s)
        assert [c.id for c in again] == [first[0].id] and again[0].attempts == 2
        outbox.mark_retry(session, again[0], "refused", RETRY, permanent=True)
        assert outbox.counts(session) == {"failed": 1, "sent": 1}
        assert outbox.retry(session).queued == 1
        assert outbox.counts(session) == {"pending": 1, "sent": 1}
        listed = outbox.list_items(session)
    assert {r.status for r in listed} == {"pending", "sent"} and all(
        len(r.image_sha256) == 64 for r in listed
    )


def test_retry_delays_grow_and_are_capped():
    delays = [RETRY.delay(n) for n in range(1, 12)]
    assert delays == sorted(delays) and delays[0] == RETRY.first_retry_s and delays[-1] == RETRY.max_retry_s


def test_results_plan_and_destination_parsing():
    assert not results_plan(Settings(database_url="sqlite://"))
    plan = results_plan(
        Settings(database_url="sqlite://", results_destination="PACS@pacs.example:104", send_key_object=True)
    )
    assert plan.destinations == ("PACS@pacs.example:104",)
    assert plan.kinds == (OutboxKind.STRUCTURED_REPORT, OutboxKind.KEY_OBJECT)
    assert Destination.parse("PACS@10.0.0.5:11112") == Destination("PACS", "10.0.0.5", 11112)
    for bad in ("pacs:104", "PACS@pacs", "PACS@pacs:x", "THIS_AE_TITLE_IS_TOO_LONG@h:1", "@h:1"):
        with pytest.raises(DestinationError):
            Destination.parse(bad)


# -- listener --------------------------------------------------------------------------------------
@pytest.fixture
def listener(tmp_path):
    started = []

    def start(**kwargs) -> StorageListener:
        scp = StorageListener(tmp_path / "drop", port=0, ae_title="CXR_TRIAGE", host="127.0.0.1", **kwargs)
        scp.start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()


def _send(port: int, datasets: list[pydicom.Dataset], calling: str = "MODALITY") -> list[int | None]:
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    if not assoc.is_established:
        return [None] * len(datasets)
    try:
        return [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets]
    finally:
        assoc.release()


COMPRESSED = [
    "siim-acr-pneumothorax__mlmed-torchxrayvision/Fake_MONOHR1.dcm",  # JPEG baseline
    "fo-dicom-testdata__dcmfx/CR-ModalitySequenceLUT.dcm",  # JPEG lossless SV1
    "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_J2KI.dcm",  # JPEG 2000
    "edge-cases__pydicom-testfiles/MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS
    "edge-cases__pydicom-testfiles/MR_small_RLE.dcm",  # RLE
    "edge-cases__pydicom-testfiles/image_dfl.dcm",  # deflate
]


@pytest.mark.extended  # real files of ../shared/data/dicom with no stand-in in a bare clone
def test_listener_accepts_compressed_syntaxes_and_writes_whole_files(listener, dicom_dir, tmp_path):
    scp = listener()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="CXR_TRIAGE")
    assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
    assoc.release()
    sources = [pydicom.dcmread(dicom_dir / name) for name in COMPRESSED]
    assert _send(scp.port, sources) == [0x0000] * len(sources)
    written = sorted((tmp_path / "drop").iterdir())
    first_of = {}  # two pydicom test files share a SOP Instance UID: one instance, the first copy kept
    for source in sources:
        first_of.setdefault(source.SOPInstanceUID, source)
    assert len(written) == len(first_of) and not [p for p in written if p.name.startswith(".")]
    received = {pydicom.dcmread(path).SOPInstanceUID: pydicom.dcmread(path) for path in written}
    for uid, source in first_of.items():
        got = received[uid]
        assert got.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert np.array_equal(got.pixel_array, source.pixel_array)
    for path in written:  # no identifier in names
        assert str(pydicom.dcmread(path).PatientID or "zz") not in path.name


def test_listener_accepts_factory_syntaxes(listener, tmp_path):
    scp = listener()
    rng = np.random.default_rng(1)
    films = [
        radiograph(rng.integers(0, 4095, (32, 32)), tmp_path / f"{n}.dcm", syntax=s, modality=m)
        for n, (s, m) in enumerate([(RLELossless, "CR"), (JPEG2000Lossless, "DX")])
    ]
    assert _send(scp.port, [pydicom.dcmread(f) for f in films]) == [0, 0]
    assert scp.stats.received == 2


def test_unknown_calling_ae_is_refused(listener, tmp_path):
    scp = listener(allowed_callers=["PACS"])
    film = pydicom.dcmread(radiograph(np.zeros((8, 8)), tmp_path / "m.dcm"))
    assert _send(scp.port, [film], calling="STRANGER") == [None]
    assert _send(scp.port, [film], calling="PACS") == [0x0000]
    assert len(list((tmp_path / "drop").iterdir())) == 1


def test_received_files_are_named_after_the_calling_ae_for_their_site(listener, tmp_path):
    """The listener keeps the sender's AE title in the file name; a site with that calling AE takes
    the film when it is registered (issue 29)."""
    from db import queue
    from db.engine import session_scope
    from db.migrate import upgrade
    from db.schema import Image
    from db.sites import add_site, calling_ae_of

    scp = listener()
    film = pydicom.dcmread(radiograph(np.zeros((8, 8)), tmp_path / "m.dcm"))
    assert _send(scp.port, [film], calling="WARD_B") == [0x0000]
    (written,) = (tmp_path / "drop").iterdir()
    assert calling_ae_of(str(written)) == "WARD_B"
    url = f"sqlite:///{tmp_path / 'db.sqlite3'}"
    upgrade(url)
    with session_scope(url) as session:
        add_site(session, "ward-b", calling_aes=["WARD_B"])
        stat = written.stat()
        image_id, _ = queue.register(
            session, queue.FileSeen(str(written), stat.st_size, stat.st_mtime_ns), "f" * 64
        )
    with session_scope(url) as session:
        assert session.get(Image, image_id).site == "ward-b"


def test_unwritable_drop_folder_answers_a_failure(listener, tmp_path):
    scp = listener()
    drop = tmp_path / "drop"
    drop.rmdir()
    drop.write_bytes(b"not a folder")  # root ignores permission bits: make writing impossible instead
    film = pydicom.dcmread(radiograph(np.zeros((16, 16)), tmp_path / "f.dcm"))
    status = _send(scp.port, [film])[0]
    assert status is not None and status != 0x0000 and (status & 0xF000) != 0xB000
    assert scp.stats.failed == 1


def test_listener_output_is_taken_by_the_pipeline(listener, tmp_path):
    """What the SCP writes is a normal DICOM file for decode (same bytes as a file-based drop)."""
    from pipeline.decode import decode_file

    scp = listener()
    film = pydicom.dcmread(radiograph(np.arange(256 * 256).reshape(256, 256) % 4096, tmp_path / "f.dcm"))
    assert _send(scp.port, [film]) == [0]
    (written,) = (tmp_path / "drop").iterdir()
    decoded = decode_file(str(written))
    assert decoded.dicom.sop_uid == film.SOPInstanceUID
    assert io.BytesIO(written.read_bytes()).getvalue()[128:132] == b"DICM"


def test_write_errors_map_to_dicom_failure_statuses():
    import errno

    from worker.dicomnet.listener import OUT_OF_RESOURCES, PROCESSING_FAILURE, store_status

    assert store_status(OSError(errno.ENOSPC, "full")) == OUT_OF_RESOURCES == 0xA700
    assert store_status(OSError(errno.EDQUOT, "quota")) == OUT_OF_RESOURCES
    assert store_status(OSError(errno.EACCES, "denied")) == PROCESSING_FAILURE == 0x0110


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs as the drop folder (needs root and mount permission; skipped otherwise)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True, timeout=30
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield folder
    subprocess.run(["umount", str(folder)], capture_output=True, timeout=30)


def test_full_disk_answers_out_of_resources_and_leaves_no_partial_file(full_disk, tmp_path):
    scp = StorageListener(full_disk, port=0, ae_title="CXR_TRIAGE", host="127.0.0.1")
    scp.start()
    try:
        film = pydicom.dcmread(radiograph(np.ones((1024, 1024)), tmp_path / "big.dcm"))  # 2 MiB
        assert _send(scp.port, [film]) == [0xA700]
        assert list(full_disk.iterdir()) == []
    finally:
        scp.stop()
