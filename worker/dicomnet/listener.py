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
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import uid
from pynetdicom import AE, evt
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


@dataclass
class ListenerStats:
    received: int = 0
    failed: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, ok: bool) -> None:
        with self.lock:
            if ok:
                self.received += 1
            else:
                self.failed += 1


def storage_ae(ae_title: str, allowed_callers: list[str] | None = None) -> AE:
    """An AE answering C-ECHO and C-STORE for every storage class in every decodable syntax."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    classes = CHEST_CLASSES + [c for c in _STORAGE_CLASSES.values() if c not in CHEST_CLASSES]
    for sop_class in classes:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    if allowed_callers:
        # Association rejected (PS3.8 9.3.4: "calling AE title not recognized") for anyone else.
        ae.require_calling_aet = list(allowed_callers)
    ae.maximum_pdu_size = 0  # no limit: large films go in big PDVs
    ae.network_timeout = 60
    ae.dimse_timeout = 120
    return ae


def instance_name(data: bytes, sop_instance_uid: str | None, calling_ae: str | None = None) -> str:
    """The drop-folder name of an instance: a digest of its SOP Instance UID (of its bytes when it has
    none), with the calling AE title kept in the name (:func:`db.sites.received_file_name`), from which
    the film's site is resolved when the file is registered (``cxr-triage sites add --calling-ae``)."""
    key = f"sop:{sop_instance_uid}".encode() if sop_instance_uid else data
    return received_file_name(hashlib.sha256(key).hexdigest()[:32], calling_ae)


def write_instance(
    drop_dir: Path, data: bytes, sop_instance_uid: str | None = None, calling_ae: str | None = None
) -> str:
    """Write ``data`` (a DICOM file's bytes) into ``drop_dir`` atomically; returns the file name.

    A file already there under the instance's name (the same instance received before) is kept: the
    new copy is not written (``os.link`` refuses an existing name, so two associations storing the
    same instance at once keep one copy too).
    """
    name = instance_name(data, sop_instance_uid, calling_ae)
    partial = drop_dir / f".{name}.{threading.get_ident()}.part"
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
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


def store_status(error: OSError) -> int:
    """A full disk or quota is "out of resources"; anything else a processing failure."""
    return OUT_OF_RESOURCES if error.errno in (errno.ENOSPC, errno.EDQUOT) else PROCESSING_FAILURE


def make_store_handler(drop_dir: Path, stats: ListenerStats):
    def handle_store(event) -> int:
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # noqa: BLE001 - a malformed request is answered, not raised
            log.warning("could not encode a received instance (%s)", type(exc).__name__)
            stats.count(False)
            return PROCESSING_FAILURE
        try:
            name = write_instance(drop_dir, data, _sop_instance_uid(event), _calling_ae(event))
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
        log.debug("received %s (%d bytes)", name[:12], len(data))
        return SUCCESS

    return handle_store


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
    ) -> None:
        self.drop_dir = Path(drop_dir)
        self.port = port
        self.host = host
        self.allowed_callers = allowed_callers or []
        self.stats = ListenerStats()
        self.ae = storage_ae(ae_title, self.allowed_callers)
        self.server = None

    def _handlers(self) -> list:
        return [
            (evt.EVT_C_STORE, make_store_handler(self.drop_dir, self.stats)),
            (evt.EVT_REJECTED, _log_rejection),
        ]

    def start(self) -> int:
        """Listen in a background thread; returns the bound port."""
        self.drop_dir.mkdir(parents=True, exist_ok=True)
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
