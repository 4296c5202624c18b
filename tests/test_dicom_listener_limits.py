"""The Storage SCP's limits against real associations (issue 25, item 8): pynetdicom as the SCU,
raw sockets for idle connections, and ``cxr-triage dicom-listen`` as a real process for memory."""

from __future__ import annotations

import socket
import stat
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import CLI
from tests.dicom_factory import radiograph
from tests.ports import free_port
from worker.dicomnet import listener as scp_module
from worker.dicomnet.listener import StorageListener


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


def _send(port: int, datasets: list[pydicom.Dataset]) -> list[int | None]:
    ae = AE(ae_title="MODALITY")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    if not assoc.is_established:
        return [None] * len(datasets)
    try:
        return [getattr(assoc.send_c_store(ds), "Status", None) for ds in datasets]
    finally:
        if assoc.is_established:
            assoc.release()


def _film(tmp_path: Path, side: int, name: str) -> pydicom.Dataset:
    rng = np.random.default_rng(side)
    return pydicom.dcmread(radiograph(rng.integers(0, 4095, (side, side)), tmp_path / name))


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    return [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(count)]


def test_ten_idle_connections_do_not_block_the_listener(listener, tmp_path):
    scp = listener()
    idle = _idle_connections(scp.port, 10)
    try:
        time.sleep(0.5)  # each is an association thread waiting for its A-ASSOCIATE-RQ
        assert _send(scp.port, [_film(tmp_path, 64, "a.dcm")]) == [0x0000]
    finally:
        for connection in idle:
            connection.close()


def test_idle_connections_are_dropped_and_free_their_slots(listener, tmp_path):
    scp = listener(limits=scp_module.ListenerLimits(max_associations=2, acse_timeout_s=1.0))
    film = _film(tmp_path, 64, "a.dcm")
    idle = _idle_connections(scp.port, 2)
    try:
        time.sleep(0.3)
        assert _send(scp.port, [film]) == [None]  # both slots taken: rejected
        for connection in idle:  # the SCP closes each silent connection after the ACSE timeout
            began = time.monotonic()
            assert connection.recv(1024) == b""  # closed, nothing sent
            assert time.monotonic() - began < 10
        time.sleep(0.5)
        assert _send(scp.port, [film]) == [0x0000]
    finally:
        for connection in idle:
            connection.close()


def test_an_instance_over_the_cap_is_answered_out_of_resources(listener, tmp_path, monkeypatch):
    received_tmp = tmp_path / "tmp"
    received_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(received_tmp))
    scp = listener(limits=scp_module.ListenerLimits(max_instance_bytes=96 * 1024))
    big, small = _film(tmp_path, 256, "big.dcm"), _film(tmp_path, 64, "small.dcm")  # 128 KiB, 8 KiB
    assert _send(scp.port, [big, small]) == [0xA700, 0x0000]
    (written,) = (tmp_path / "drop").iterdir()
    assert pydicom.dcmread(written).SOPInstanceUID == small.SOPInstanceUID
    assert scp.stats.too_large == 1 and scp.stats.received == 1
    assert list(received_tmp.iterdir()) == []  # the temporary files are gone


def test_a_transfer_far_over_the_cap_is_aborted_and_leaves_nothing(listener, tmp_path, monkeypatch):
    received_tmp = tmp_path / "tmp"
    received_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(received_tmp))
    scp = listener(limits=scp_module.ListenerLimits(max_instance_bytes=64 * 1024))
    huge = _film(tmp_path, 1024, "huge.dcm")  # 2 MiB
    assert _send(scp.port, [huge]) == [None]  # aborted: no status
    assert _send(scp.port, [_film(tmp_path, 64, "small.dcm")]) == [0x0000]  # the listener goes on
    time.sleep(0.5)
    assert list(received_tmp.iterdir()) == []
    assert [p.name for p in (tmp_path / "drop").iterdir() if p.name.startswith(".")] == []


def test_received_files_are_readable_by_their_owner_only(listener, tmp_path):
    scp = listener()
    assert _send(scp.port, [_film(tmp_path, 64, "a.dcm")]) == [0x0000]
    (written,) = (tmp_path / "drop").iterdir()
    assert stat.S_IMODE(written.stat().st_mode) == 0o600


def _echo_ok(port: int) -> bool:
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    if not assoc.is_established:
        return False
    ok = assoc.send_c_echo().Status == 0x0000
    assoc.release()
    return ok


def test_a_large_instance_is_received_to_disk_not_memory(tmp_path):
    """A 128 MB C-STORE to the real `dicom-listen` process: its memory grows by far less (before:
    112 -> 909 MB for 392 MB), and the file arrives whole."""
    rows = 8192
    pixels = np.zeros((rows, rows), dtype=np.uint16)
    pixels[::97, ::89] = 1000
    source = radiograph(pixels, tmp_path / "large.dcm")
    del pixels
    port = free_port()
    drop = tmp_path / "drop"
    with open(tmp_path / "listen.log", "w") as log:
        process = subprocess.Popen(
            [CLI, "dicom-listen", str(drop), "--port", str(port), "--bind", "127.0.0.1"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while not _safe_echo(port):
            started = process.poll() is None and time.monotonic() < deadline
            assert started, (tmp_path / "listen.log").read_text()
            time.sleep(0.3)
        watched = psutil.Process(process.pid)
        baseline = watched.memory_info().rss
        peak = [baseline]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], watched.memory_info().rss)
                time.sleep(0.02)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            status = _send_file(port, source)
        finally:
            done.set()
            sampler.join()
        assert status == 0x0000
        (written,) = drop.iterdir()
        assert written.stat().st_size >= source.stat().st_size - 1024
        grew_mb = (peak[0] - baseline) / 2**20
        assert grew_mb < 48, f"the listener grew by {grew_mb:.0f} MB for a 128 MB instance"
    finally:
        process.terminate()
        process.wait(timeout=30)


def _safe_echo(port: int) -> bool:
    try:
        return _echo_ok(port)
    except OSError:
        return False


def _send_file(port: int, path: Path) -> int | None:
    """C-STORE straight from the file, in chunks (the SCU's own memory stays small too)."""
    from pynetdicom import _config

    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE")
    assert assoc.is_established
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        return getattr(assoc.send_c_store(path), "Status", None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
