"""The outbox sender: build each pending object and C-STORE it to its destination, with backoff.

Runs as a background thread in ``watch``, ``scan`` and the ``worker`` supervisor
(:func:`start_results_sender`). Rows live in the database (:mod:`db.outbox`), so a
restart resumes where the last run stopped, and a destination that is down is
retried with a growing delay (2 s doubling to 60 s) until it is back.

Objects are built at send time from the stored score and the source film's header. The film's
bytes are read once and must hash to the film's stored SHA-256: a file replaced since it was scored
(a modality reusing a file name while the PACS was down) holds another patient's header, and an SR
built from it would carry that patient's identity with this film's score. Such a row, and one whose
film is gone, is failed with a reason and nothing is sent; a film that cannot be read just now
(permission, a share not mounted) is retried with backoff. The SOP Instance UID is
kept in the outbox before the first C-STORE: a resend after a crash between the
PACS's success and our bookkeeping stores the same instance again, which a PACS
treats as the same object (PS3.4 B.4.1.3), not as a second report.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from db import outbox
from db.engine import session_scope
from db.outbox import Claimed
from db.paths import from_db
from db.queue import scrub_reason
from db.schema import OutboxKind, OutboxStatus, utcnow
from worker.dicomnet.plan import Destination, DestinationError
from worker.logs import describe_error, short
from worker.settings import Settings

if TYPE_CHECKING:
    from worker.dicomnet import objects

# pydicom, pynetdicom and highdicom (worker.dicomnet.objects) are imported by the methods that use
# them: a command with no results destination (every plain scan) starts no sender and never loads them.

log = logging.getLogger(__name__)

#: A scan waits for its results until each pending one has failed this many times (2 s + 4 s of backoff).
DRAIN_ATTEMPTS = 3
#: ... and for rows of earlier runs whose next try falls within this many seconds.
DRAIN_DUE_S = 20.0
#: Statuses that mean the object itself is refused: resending it unchanged cannot help (PS3.4 B.2.3).
PERMANENT_FAILURES = (0xA900, 0xC000)


@functools.cache
def sop_classes() -> dict:
    """The Storage SOP Class that each outbox kind is sent as."""
    from pynetdicom.sop_class import (
        ComprehensiveSRStorage,
        KeyObjectSelectionDocumentStorage,
        SecondaryCaptureImageStorage,
    )

    return {
        OutboxKind.STRUCTURED_REPORT: ComprehensiveSRStorage,
        OutboxKind.SECONDARY_CAPTURE: SecondaryCaptureImageStorage,
        OutboxKind.KEY_OBJECT: KeyObjectSelectionDocumentStorage,
    }


class SourceGone(Exception):
    """The film this result is about is at no known path any more (replaced or deleted): no object."""


class SourceUnreadable(Exception):
    """The film's file cannot be read just now (permission, a share not mounted): try again later."""


def read_film(paths: list[str], sha256: str) -> bytes:
    """The bytes of the first stored path whose content still hashes to ``sha256``.

    Each candidate is read once and hashed; the bytes returned are the bytes checked. Raises
    :class:`SourceGone` when every path is missing (in a folder that is still there) or shows other
    content, :class:`SourceUnreadable` when some path could not be read now. Messages hold no path.
    """
    from pipeline.hashing import sha256_bytes
    from pipeline.limits import MAX_FILE_BYTES

    replaced = unreadable = 0
    why = ""
    for candidate in (c for stored in paths for c in from_db(stored)):
        try:
            with open(candidate, "rb") as handle:
                data = handle.read(MAX_FILE_BYTES + 1)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.isdir(os.path.dirname(candidate) or "."):
                continue  # deleted from a folder that is still there: gone
            unreadable += 1  # the folder itself is missing: a share not mounted, perhaps
            why = "its folder is not there"
            continue
        except IsADirectoryError:
            replaced += 1
            continue
        except OSError as exc:  # EACCES, EIO, ESTALE, ENOTCONN: a permission or a share problem
            unreadable += 1
            why = _os_reason(exc)
            continue
        if sha256_bytes(data) == sha256:
            return data
        replaced += 1
    if unreadable:
        raise SourceUnreadable(f"the film cannot be read now ({why}); will retry")
    if replaced:
        raise SourceGone(
            "the film's file now holds other content (replaced since it was scored): no result sent, "
            "so that it cannot reach another patient's record"
        )
    if not paths:  # a rescan moved its paths to the content they show now, or forgot them
        raise SourceGone(
            "the film's content is no longer at any known path (its file was replaced or deleted since "
            "it was scored): no result sent, so that it cannot reach another patient's record"
        )
    raise SourceGone("the film is no longer at any known path (deleted): no result sent")


def _os_reason(exc: OSError) -> str:
    """An OSError without its file name (a path identifies a patient)."""
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


class OutboxSender:
    """Sends due outbox rows until stopped; safe to run in several processes at once."""

    def __init__(
        self,
        database_url: str,
        *,
        retry: outbox.RetryPolicy,
        calling_ae_title: str = "CXR_TRIAGE",
        model_dir: Path | None = None,
        poll_seconds: float = 0.25,
        batch: int = 16,
    ) -> None:
        self.database_url = database_url
        self.retry = retry
        self.calling_ae_title = calling_ae_title
        self.model_dir = model_dir
        self.poll_seconds = poll_seconds
        self.batch = batch
        self.stop_event = threading.Event()
        self.idle = threading.Event()
        self._thread: threading.Thread | None = None
        self._model_name: str | None = None
        self._explainer = None  # the serving model, for heat maps (loaded on first use)
        self.started_at = utcnow()  # rows made before it are an earlier run's (see drain)
        self.backoff_s = 0.0
        #: Objects this sender delivered and failed for good (a scan reports them).
        self.sent_count = self.failed_count = 0
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it quotes headers at DEBUG

    # -- thread ---------------------------------------------------------------------------------
    def start(self) -> None:
        self.started_at = utcnow()
        self._thread = threading.Thread(target=self.run, name="outbox-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                sent_any = self.send_due()
                self.backoff_s = 0.0
            except Exception as exc:  # noqa: BLE001 - a database outage must not end the thread
                self.backoff_s = min(max(self.backoff_s * 2, 1.0), 30.0)
                log.warning("outbox: %s; retrying in %.0f s", describe_error(exc), self.backoff_s)
                self.stop_event.wait(self.backoff_s)
                continue
            if not sent_any:
                self.idle.set()
                self.stop_event.wait(self.poll_seconds)

    def drain(self, timeout: float, give_up_after: int = DRAIN_ATTEMPTS) -> dict[str, int]:
        """Wait (at most ``timeout`` s) until nothing is pending, or every pending row has failed
        ``give_up_after`` times (the destination is away: the next run sends them); returns the
        outbox counts."""
        deadline = time.monotonic() + timeout
        # an earlier run's rows whose next try comes within DRAIN_DUE_S are waited for
        due_by = utcnow() + timedelta(seconds=min(timeout, DRAIN_DUE_S))
        while True:
            with session_scope(self.database_url) as session:
                counts = outbox.counts(session)
                hopeless = counts.get(OutboxStatus.PENDING) and not outbox.pending_untried(
                    session, give_up_after, due_by, self.started_at
                )
            if not counts.get(OutboxStatus.PENDING) or hopeless or time.monotonic() >= deadline:
                return counts
            time.sleep(min(self.poll_seconds, max(deadline - time.monotonic(), 0.01)))

    # -- one round ------------------------------------------------------------------------------
    def send_due(self) -> bool:
        """Claim what is due and send it, one association per destination; True if anything was due."""
        with session_scope(self.database_url) as session:
            claimed = outbox.claim_due(session, self.retry.claim_lease_s, self.batch)
        if not claimed:
            return False
        self.idle.clear()
        by_destination: dict[str, list[Claimed]] = defaultdict(list)
        for item in claimed:
            by_destination[item.destination].append(item)
        for destination, items in by_destination.items():
            if self.stop_event.is_set():
                with session_scope(self.database_url) as session:
                    outbox.release(session, items)
                continue
            self._send_to(destination, items)
        return True

    def _send_to(self, destination_text: str, items: list[Claimed]) -> None:
        try:
            destination = Destination.parse(destination_text)
        except DestinationError as exc:
            self._finish_all(items, str(exc), permanent=True)
            return
        built = []
        for item in items:
            dataset = self._build_or_fail(item)
            if dataset is not None:
                built.append((item, dataset))
        if not built:
            return
        from pynetdicom import AE

        ae = AE(ae_title=self.calling_ae_title)
        for sop_class in sop_classes().values():
            ae.add_requested_context(sop_class)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            why = "association rejected" if assoc.is_rejected else "destination unreachable"
            self._finish_all([item for item, _ in built], f"{why} ({destination.ae_title})")
            log.warning("outbox: %s %s; %d object(s) will be retried", why, destination.ae_title, len(built))
            return
        try:
            for number, (item, dataset) in enumerate(built):
                if not assoc.is_established:
                    self._finish_all([i for i, _ in built[number:]], "association lost")
                    break
                self._store_one(assoc, item, dataset)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_one(self, assoc, item: Claimed, dataset) -> None:
        accepted = {context.abstract_syntax for context in assoc.accepted_contexts}
        sop_class = sop_classes()[item.kind]
        if sop_class not in accepted:  # PS3.8 9.3.3.2: the PACS refused this SOP class
            self._finish(item, f"the destination does not accept {sop_class.name}", permanent=True)
            return
        try:
            status = assoc.send_c_store(dataset)
        except Exception as exc:  # noqa: BLE001 - network errors become a retry
            self._finish(item, f"C-STORE error: {type(exc).__name__}")
            return
        code = getattr(status, "Status", None)
        if code is None:
            self._finish(item, "no answer to C-STORE (timeout or connection lost)")
        elif code == 0x0000 or (code & 0xF000) == 0xB000:  # success, or warning (PS3.4 B.2.3)
            with session_scope(self.database_url) as session:
                if outbox.mark_sent(session, item):
                    self.sent_count += 1
            log.info(
                "outbox: sent %s for image %d to %s",
                item.kind.name.lower(),
                item.image_id,
                item.destination.split("@")[0],
            )
        else:
            permanent = any((code & 0xFF00) == p or (code & 0xF000) == p for p in PERMANENT_FAILURES)
            self._finish(item, f"destination answered status 0x{code:04X}", permanent=permanent)

    def _finish(self, item: Claimed, error: str, *, permanent: bool = False) -> None:
        error = scrub_reason(error)  # a library's message may quote a path: not in the log either
        with session_scope(self.database_url) as session:
            status = outbox.mark_retry(session, item, error, self.retry, permanent=permanent)
        if status is OutboxStatus.FAILED:
            self.failed_count += 1
            log.error(
                "outbox: %s for image %d failed for good: %s", item.kind.name.lower(), item.image_id, error
            )

    def _finish_all(self, items: list[Claimed], error: str, *, permanent: bool = False) -> None:
        for item in items:
            self._finish(item, error, permanent=permanent)

    # -- building -------------------------------------------------------------------------------
    def _build_or_fail(self, item: Claimed):
        from worker.dicomnet import objects

        try:
            return self.build(item)
        except SourceGone as exc:
            self._finish(item, str(exc), permanent=True)
        except SourceUnreadable as exc:
            self._finish(item, str(exc))
        except objects.SourceProblem as exc:
            self._finish(item, str(exc), permanent=True)
        except Exception as exc:  # noqa: BLE001 - one bad header must not stop the others
            self._finish(item, f"could not build the object: {describe_error(exc)}", permanent=True)
        return None

    def build(self, item: Claimed):
        """The dataset for one row, with the SOP Instance UID remembered before it is sent."""
        import pydicom
        from pydicom.uid import generate_uid

        from worker.dicomnet import objects

        with session_scope(self.database_url) as session:
            context = outbox.send_context(session, item)
            if context is None:
                raise SourceGone("the score this object reports is no longer stored")
            sop_instance_uid = item.sop_instance_uid or generate_uid()
            if item.sop_instance_uid is None:
                outbox.remember_uid(session, item, sop_instance_uid)
        data = read_film(context.paths, context.sha256)  # the bytes checked are the bytes used
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        result = self._result(context)
        log.debug("outbox: building %s for %s", item.kind.name.lower(), short(context.sha256))
        if item.kind is OutboxKind.STRUCTURED_REPORT:
            return objects.structured_report(header, result, sop_instance_uid)
        if item.kind is OutboxKind.KEY_OBJECT:
            return objects.key_object(header, result, sop_instance_uid)
        return objects.secondary_capture(header, self._overlay(data), sop_instance_uid, result)

    def _result(self, context: outbox.SendContext) -> objects.Result:
        from worker.dicomnet import objects

        score, calibration = context.score, context.calibration
        return objects.Result(
            pneumonia_probability=calibration.probability,
            viral_probability=score.viral_probability,
            screening_threshold=calibration.screening_threshold,
            high_confidence_threshold=calibration.high_confidence_threshold,
            model_name=self.model_name(),
            model_version=score.model_version,
            calibration=calibration.name,
            out_of_scope=context.out_of_scope,
            scope_reasons=tuple(r.strip() for r in (context.scope_note or "").split(";") if r.strip()),
            validated_population=self.validated_population(),
        )

    def validated_population(self) -> str:
        """The model's validated population in words (its metadata's ``validated_population``)."""
        from pipeline.scope import ScopePolicy

        try:
            metadata = json.loads((self._resolved_model_dir() / "metadata.json").read_text())
        except (OSError, ValueError):
            metadata = {}
        return ScopePolicy.from_metadata(metadata).describe()

    def model_name(self) -> str:
        if self._model_name is None:
            try:
                metadata = json.loads((self._resolved_model_dir() / "metadata.json").read_text())
                self._model_name = str(metadata.get("architecture") or "cxr-pneumonia")
            except (OSError, ValueError):
                self._model_name = "cxr-pneumonia"
        return self._model_name

    def _resolved_model_dir(self) -> Path:
        if self.model_dir is not None:
            return Path(self.model_dir)
        from models import default_model_dir

        return default_model_dir()

    def _overlay(self, data: bytes):
        """The class activation map of the film's checked bytes, from the serving graph (LiteRT: no
        TensorFlow; the model is loaded in this process on first use)."""
        from pipeline.decode import decode_bytes
        from pipeline.inference import Scorer
        from worker.dicomnet import objects

        if self._explainer is None:
            self._explainer = Scorer.load(self._resolved_model_dir(), features=True)
        grey = decode_bytes(data).pixels
        return objects.overlay_rgb(grey, self._explainer.film_heatmap(grey))


@dataclass(frozen=True)
class ResultsReport:
    """What a command's sender did, for its summary: delivered and failed for good in this run, and
    what is still pending in the outbox (sent by the next watch, scan or worker)."""

    sent: int
    failed: int
    pending: int

    @property
    def delivered(self) -> bool:
        return not (self.failed or self.pending)

    def as_dict(self) -> dict[str, int]:
        return {"results_sent": self.sent, "results_failed": self.failed, "results_pending": self.pending}


class SenderHandle:
    """A running sender (or nothing, without a destination) that a command closes on its way out."""

    def __init__(self, sender: OutboxSender | None) -> None:
        self.sender = sender

    def close(self, drain_s: float = 0.0) -> ResultsReport | None:
        """Stop the thread; with ``drain_s`` (``scan``) first wait that long for pending objects.
        Returns what was sent (None without a destination)."""
        if self.sender is None:
            return None
        sender, counts = self.sender, {}
        try:
            if drain_s:
                counts = _drain_and_report(sender, drain_s)
        finally:
            sender.stop()
            self.sender = None
        if not drain_s:
            try:
                with session_scope(sender.database_url) as session:
                    counts = outbox.counts(session)
            except Exception as exc:  # noqa: BLE001 - a command on its way out must not fail here
                log.warning("outbox: cannot count what is pending (%s)", describe_error(exc))
        return ResultsReport(sender.sent_count, sender.failed_count, counts.get(OutboxStatus.PENDING, 0))


def retry_policy(settings: Settings) -> outbox.RetryPolicy:
    """The outbox's claim lease and retry schedule, from the settings."""
    return outbox.RetryPolicy(
        claim_lease_s=settings.outbox_claim_lease_s,
        first_retry_s=settings.outbox_first_retry_s,
        max_retry_s=settings.outbox_max_retry_s,
        max_attempts=settings.outbox_max_attempts,
    )


def start_results_sender(settings: Settings) -> SenderHandle:
    """Start the outbox sender thread when results go somewhere; see :class:`SenderHandle`."""
    if not settings.results_destination:
        return SenderHandle(None)
    sender = OutboxSender(
        settings.database_url,
        retry=retry_policy(settings),
        calling_ae_title=settings.dicom_ae_title,
        model_dir=settings.model_dir,
    )
    # The DICOM stack is imported here, before the thread starts: two threads importing highdicom,
    # pydicom or pynetdicom for the first time at once can meet a partly initialised module. A scan's
    # entry leaves pydicom unloaded, so its process settings are set here too (idempotent).
    import pynetdicom  # noqa: F401

    import worker.dicomnet.objects  # noqa: F401
    from pipeline.dicom import configure_pydicom

    configure_pydicom()

    sender.start()
    return SenderHandle(sender)


def _drain_and_report(sender: OutboxSender, drain_s: float) -> dict[str, int]:
    counts = sender.drain(drain_s)
    if counts.get(OutboxStatus.PENDING):
        log.warning(
            "outbox: %d object(s) still pending; the next watch, scan or worker sends them",
            counts[OutboxStatus.PENDING],
        )
    return counts
