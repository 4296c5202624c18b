"""``dicom-listen``: a DICOM Storage SCP that drops received instances into a watched folder.

Modalities and PACS push films with C-STORE (PS3.4 Annex B, Storage Service Class). Each instance
is written, with its File Meta Information (PS3.10 7.1), to a hidden ``.part`` file in the drop
folder, flushed to disk, then renamed into place: ``watch`` ignores hidden and ``.part`` names and
sees the rename as a complete file. The file is named by a hash of its SOP Instance UID (no patient
identifiers): the SOP Instance UID identifies the instance (PS3.3 C.12.1.1.1), so the same instance
sent again, even in another transfer syntax (other bytes), is a duplicate of the first copy, which is
kept, as a PACS keeps it; the sender is answered success.

Success (0x0000) is answered only once the file is on disk. A full disk answers 0xA700 "Refused:
Out of Resources" and any other write error 0x0110 "Processing failure" (PS3.4 B.2.3, PS3.7 C.4.2):
the sender keeps the instance and may retry; nothing is lost silently.

Limits (:class:`ListenerLimits`, from the settings), so that no peer can block or exhaust it:

* at most ``max_associations`` at once; a connection that sends no A-ASSOCIATE-RQ within
  ``acse_timeout_s`` and an association silent for ``network_timeout_s`` are dropped, so idle TCP
  connections free their slot;
* instances are received in chunks straight to a temporary file (pynetdicom's
  ``STORE_RECV_CHUNKED_DATASET``), never whole in memory, in PDUs of at most ``MAX_PDU_BYTES``;
* an instance larger than ``max_instance_bytes`` is answered 0xA700 (out of resources) and not
  kept; a transfer that goes on past twice that is aborted (A-ABORT) so it cannot fill the disk;
* received files are written with mode 0600 (patient data, like the database).

pynetdicom's default storage contexts accept only uncompressed transfer syntaxes; here every storage
SOP class accepts every syntax the pipeline decodes (JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000, HTJ2K, RLE, deflate, big endian). Objects that are not chest films are accepted too and
then rejected with a reason by the pipeline, as files dropped by hand are.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid
from pynetdicom import AE, _config, evt
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification

from db.sites import received_file_name

log = logging.getLogger(__name__)

#: Transfer syntaxes the pipeline decodes (pydicom with pylibjpeg and its plugins).
TRANSFER_SYNTAXES = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.HTJ2K,
    uid.RLELossless,
]
#: Chest film SOP classes first (CR, DX for presentation and processing), then every other storage class.
CHEST_CLASSES = [
    uid.ComputedRadiographyImageStorage,
    uid.DigitalXRayImageStorageForPresentation,
    uid.DigitalXRayImageStorageForProcessing,
]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110
#: The largest PDU this SCP asks peers to send: received data is buffered one PDU at a time.
MAX_PDU_BYTES = 1024 * 1024
_COPY_CHUNK = 1024 * 1024
_P_DATA_TF = 0x04


@dataclass(frozen=True)
class ListenerLimits:
    """What one listener allows (defaults: :class:`worker.settings.Settings`)."""

    max_associations: int = 32
    acse_timeout_s: float = 10.0
    network_timeout_s: float = 60.0
    dimse_timeout_s: float = 120.0
    max_instance_bytes: int = 512 * 1024 * 1024

    @classmethod
    def from_settings(cls, settings) -> ListenerLimits:
        return cls(
            max_associations=settings.dicom_max_associations,
            acse_timeout_s=settings.dicom_acse_timeout,
            network_timeout_s=settings.dicom_network_timeout,
            max_instance_bytes=int(settings.dicom_max_instance_mb * 1024 * 1024),
        )


@dataclass
class ListenerStats:
    received: int = 0
    failed: int = 0
    too_large: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.received += 1
            else:
                self.failed += 1

    def count_too_large(self) -> None:
        with self.lock:
            self.too_large += 1
            self.failed += 1


def storage_ae(
    ae_title: str, allowed_callers: list[str] | None = None, limits: ListenerLimits | None = None
) -> AE:
    """An AE answering C-ECHO and C-STORE for every storage class in every decodable syntax."""
    limits = limits or ListenerLimits()
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    classes = CHEST_CLASSES + [c for c in _STORAGE_CLASSES.values() if c not in CHEST_CLASSES]
    for sop_class in classes:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if allowed_callers:
        # Association rejected (PS3.8 9.3.4: "calling AE title not recognized") for anyone else.
        ae.require_calling_aet = list(allowed_callers)
    ae.maximum_pdu_size = MAX_PDU_BYTES  # peers send at most this much per PDU (memory per read)
    ae.maximum_associations = limits.max_associations
    ae.acse_timeout = limits.acse_timeout_s  # also the ARTIM timer: a silent new connection is closed
    ae.network_timeout = limits.network_timeout_s
    ae.dimse_timeout = limits.dimse_timeout_s
    return ae


def _open_private(path: Path):
    """A new file only its owner can read (received films are patient data, like the database)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb")


def instance_name(data: bytes, sop_instance_uid: str | None, calling_ae: str | None = None) -> str:
    """The drop-folder name of an instance: a digest of its SOP Instance UID (of its bytes when it has
    none), with the calling AE title kept in the name (:func:`db.sites.received_file_name`), from which
    the film's site is resolved when the file is registered (``cxr-triage sites add --calling-ae``)."""
    key = f"sop:{sop_instance_uid}".encode() if sop_instance_uid else data
    return received_file_name(hashlib.sha256(key).hexdigest()[:32], calling_ae)


def _place(drop_dir: Path, write, name: str) -> str:
    """Write through ``write(handle)`` into a hidden 0600 .part file, fsync, and link it to ``name``.

    A file already there under the instance's name (the same instance received before) is kept: the
    new copy is not written (``os.link`` refuses an existing name, so two associations storing the
    same instance at once keep one copy too).
    """
    partial = drop_dir / f".{name}.{threading.get_ident()}.part"
    try:
        with _open_private(partial) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(partial, drop_dir / name)
        except FileExistsError:
            log.info(
                "received an instance already in the drop folder (%s); the first copy is kept", name[:12]
            )
        except OSError:  # a file system without hard links: replace (the older behaviour)
            if not (drop_dir / name).exists():
                os.replace(partial, drop_dir / name)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
    return name


def write_instance(
    drop_dir: Path, data: bytes, sop_instance_uid: str | None = None, calling_ae: str | None = None
) -> str:
    """Write ``data`` (a DICOM file's bytes) into ``drop_dir`` atomically; returns the file name."""
    name = instance_name(data, sop_instance_uid, calling_ae)
    return _place(drop_dir, lambda handle: handle.write(data), name)


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        for chunk in iter(lambda: source.read(_COPY_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_received_file(
    drop_dir: Path, received: Path, sop_instance_uid: str | None = None, calling_ae: str | None = None
) -> str:
    """Copy a received file (pynetdicom's temporary file) into ``drop_dir`` atomically, in chunks;
    named as :func:`instance_name` names it (the bytes' digest computed in chunks when there is no UID)."""
    if sop_instance_uid:
        name = instance_name(b"", sop_instance_uid, calling_ae)
    else:
        name = received_file_name(_file_digest(received)[:32], calling_ae)

    def copy(handle) -> None:
        with open(received, "rb") as source:
            for chunk in iter(lambda: source.read(_COPY_CHUNK), b""):
                handle.write(chunk)

    return _place(drop_dir, copy, name)


def store_status(error: OSError) -> int:
    """A full disk or quota is "out of resources"; anything else a processing failure."""
    return OUT_OF_RESOURCES if error.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE


def make_store_handler(drop_dir: Path, stats: ListenerStats, max_instance_bytes: int | None = None):
    def handle_store(event) -> int:
        try:
            received = Path(event.dataset_path)
            size = received.stat().st_size
        except Exception as exc:  # noqa: BLE001 - a malformed request is answered, not raised
            log.warning("could not read a received instance (%s)", type(exc).__name__)
            stats.count(False)
            return PROCESSING_FAILURE
        if max_instance_bytes is not None and size > max_instance_bytes:
            log.warning(
                "refused an instance of %d MB (limit %d MB); answered 0x%04X",
                size // 2**20,
                max_instance_bytes // 2**20,
                OUT_OF_RESOURCES,
            )
            stats.count_too_large()
            return OUT_OF_RESOURCES
        try:
            name = write_received_file(drop_dir, received, _sop_instance_uid(event), _calling_ae(event))
        except OSError as exc:
            status = store_status(exc)
            log.error(
                "cannot write a received instance into the drop folder (%s); answered 0x%04X",
                os.strerror(exc.errno) if exc.errno else type(exc).__name__,
                status,
            )
            stats.count(False)
            return status
        stats.count(True)
        log.debug("received %s (%d bytes)", name[:12], size)
        return SUCCESS

    return handle_store


class TransferGuard:
    """Counts the data bytes of the C-STORE being received on each association; one that goes on
    past ``abort_after_bytes`` is aborted (its status would be 0xA700 anyway, and its temporary file
    must not fill the disk)."""

    def __init__(self, abort_after_bytes: int) -> None:
        self.abort_after_bytes = abort_after_bytes
        self._received: dict[int, int] = {}
        self._lock = threading.Lock()

    def on_data(self, event) -> None:
        data = event.data
        if len(data) < 12 or data[0] != _P_DATA_TF:
            return
        # First PDV of the PDU: 4-byte length, context id, message control header (PS3.8 E.2).
        command = data[11] & 0x01
        key = id(event.assoc)
        with self._lock:
            total = 0 if command else self._received.get(key, 0) + struct.unpack(">L", data[2:6])[0]
            self._received[key] = total
        if total > self.abort_after_bytes:
            limit_mb = self.abort_after_bytes // 2**20
            log.warning("aborted an association sending an instance over %d MB", limit_mb)
            with self._lock:
                self._received.pop(key, None)
            event.assoc.abort(block=False)

    def on_close(self, event) -> None:
        with self._lock:
            self._received.pop(id(event.assoc), None)
        _remove_partial_receive(event.assoc)


def _remove_partial_receive(assoc) -> None:
    """pynetdicom keeps the temporary file of a C-STORE cut off by an abort: remove it (best effort,
    through a private attribute; without it the file stays in the temporary folder)."""
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    path = getattr(message, "_data_set_path", None)
    if path is not None:
        with contextlib.suppress(OSError, TypeError):
            os.unlink(path)


def _calling_ae(event) -> str | None:
    """The AE title the sender called from (pynetdicom keeps it on the association's requestor)."""
    try:
        title = event.assoc.requestor.ae_title
    except AttributeError:
        return None
    return title.decode("ascii", "replace") if isinstance(title, bytes) else title


def _sop_instance_uid(event) -> str | None:
    """The Affected SOP Instance UID of the C-STORE request (PS3.7 9.1.1.1), if it looks like a UID."""
    value = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "").strip()
    return value if value and len(value) <= 64 else None


def _log_rejection(event) -> None:
    log.warning("refused an association from an AE title not in --allowed-callers")


class StorageListener:
    """Runs the SCP in the background (``start``/``stop``) or in the foreground (``serve``)."""

    def __init__(
        self,
        drop_dir: Path,
        *,
        port: int,
        ae_title: str,
        allowed_callers: list[str] | None = None,
        host: str = "0.0.0.0",
        limits: ListenerLimits | None = None,
    ) -> None:
        self.drop_dir = Path(drop_dir)
        self.port = port
        self.host = host
        self.allowed_callers = allowed_callers or []
        self.limits = limits or ListenerLimits()
        self.stats = ListenerStats()
        self.ae = storage_ae(ae_title, self.allowed_callers, self.limits)
        self.guard = TransferGuard(2 * self.limits.max_instance_bytes)
        self.server = None

    def _handlers(self) -> list:
        return [
            (evt.EVT_C_STORE, make_store_handler(self.drop_dir, self.stats, self.limits.max_instance_bytes)),
            (evt.EVT_REJECTED, _log_rejection),
            (evt.EVT_DATA_RECV, self.guard.on_data),
            (evt.EVT_CONN_CLOSE, self.guard.on_close),
        ]

    def start(self) -> int:
        """Listen in a background thread; returns the bound port."""
        self.drop_dir.mkdir(parents=True, exist_ok=True)
        # Write each received data set to a temporary file as it arrives (process-wide in pynetdicom;
        # this process only receives C-STOREs here).
        _config.STORE_RECV_CHUNKED_DATASET = True
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it quotes headers at DEBUG
        self.server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=self._handlers())
        self.port = self.server.server_address[1]
        return self.port

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def serve(self, stop: threading.Event) -> None:
        self.start()
        try:
            stop.wait()
        finally:
            self.stop()
