"""Claim a batch of images, decode them in parallel, score them in one model call, store results.

Shared by the embedded path (``scan``/``watch`` without a broker) and the Celery
tasks, so both give the same scores.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sqlalchemy import select

from db import outbox, queue
from db.engine import session_scope
from db.paths import from_db
from db.queue import as_utc
from db.schema import Image, ImageStatus, utcnow
from pipeline.lungs import InputPlan
from pipeline.model_folder import Engine
from pipeline.scope import ScopePolicy
from worker import metrics
from worker.dicomnet.plan import results_plan
from worker.logs import short
from worker.outcomes import TRANSIENT_ERRNOS, Outcome, is_transient
from worker.scoring.decode_pool import DecodePool, PendingBatch
from worker.scoring.overlap import prefetched
from worker.scoring.prepare import Prepared
from worker.settings import Settings, default_of

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    counts: Counter
    retry_later: list[int]


#: Batches decoding ahead of the one being scored once the model is loaded (while it loads, the
#: whole call's batches are handed to the pool, so decoding overlaps the TensorFlow start-up).
DECODE_AHEAD_BATCHES = 2


@dataclass
class _Started:
    """A batch whose files are decoding in the pool, not claimed yet (see ``Processor._start_batch``)."""

    image_ids: list[int]
    located: dict
    known: dict
    todo: list[int]
    pending: PendingBatch | None
    plan: InputPlan
    #: Decodes made when the files were registered (``DecodePool.predecode``), by image id.
    cached: dict[int, Prepared] = field(default_factory=dict)
    counts: Counter = field(default_factory=Counter)
    claimed: list[int] = field(default_factory=list)

    @property
    def to_decode(self) -> list[int]:
        """The images of ``todo`` handed to the pool (``pending`` holds their decodes, in this order)."""
        return [image_id for image_id in self.todo if image_id not in self.cached]


class Processor:
    """Turns image ids into final states. The model is loaded on first use, in this process."""

    def __init__(
        self,
        database_url: str,
        model_dir,
        pool: DecodePool,
        *,
        batch_size: int | None = None,
        lease_seconds: float | None = None,
        retry_incomplete: bool = False,
        incomplete_grace_s: float = 600.0,
        owner: str | None = None,
        full_resolution_decode: bool = False,
        outbox_plan: outbox.OutboxPlan = outbox.NO_RESULTS,
        claim_before_decode: bool = False,
        inference_engine: Engine = Engine.AUTO,
    ) -> None:
        self.database_url = database_url
        #: What runs the model (``Settings.inference_engine``).
        self.inference_engine = inference_engine
        self.model_dir = model_dir
        self.pool = pool
        self.batch_size = batch_size or default_of("batch_size")
        self.lease_seconds = lease_seconds or default_of("lease_seconds")
        #: Passed to the decode pool per batch (reduced-resolution decode is the default).
        self.full_resolution_decode = full_resolution_decode
        self.retry_incomplete = retry_incomplete
        #: How long after its arrival a file that looks incomplete is retried before it is failed.
        self.incomplete_grace_s = incomplete_grace_s
        self._scorer = None
        #: {site: thresholds} of each site's calibration in force, read per batch
        self._thresholds: dict[str, tuple[float, float]] = {}
        #: Lease owner used when a call names none (in-process work); a Celery task passes its id.
        self.default_owner = owner
        self.owner: str | None = owner
        #: DICOM objects to send back for each scored DICOM film (issue 11; empty: nothing is sent).
        self.outbox_plan = outbox_plan
        #: Claim each batch as soon as it is taken on, not once it is decoded. A Celery worker does:
        #: the supervisor hands a killed worker's claimed images back at once, while images it was
        #: still decoding unclaimed would wait for the lost-message re-send (seen in the chaos suite).
        self.claim_before_decode = claim_before_decode

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        pool: DecodePool,
        *,
        retry_incomplete: bool = False,
        owner: str | None = None,
        claim_before_decode: bool = False,
    ) -> Processor:
        return cls(
            settings.database_url,
            settings.resolved_model_dir(),
            pool,
            batch_size=settings.batch_size,
            lease_seconds=settings.lease_seconds,
            retry_incomplete=retry_incomplete,
            owner=owner,
            full_resolution_decode=settings.full_resolution_decode,
            outbox_plan=results_plan(settings),
            claim_before_decode=claim_before_decode,
            inference_engine=settings.inference_engine,
        )

    @property
    def scorer(self):
        if self._scorer is None:
            from pipeline.inference import Scorer

            self._scorer = Scorer.load(self.model_dir, engine=self.inference_engine)
            log.info(
                "model %s loaded (input %d px, %s)",
                self._scorer.version,
                self._scorer.input_size,
                self._scorer.engine,
            )
            metrics.model_loaded(self._scorer)
        return self._scorer

    def process(
        self,
        image_ids: Sequence[int],
        owner: str | None = None,
        predecoded: Mapping[str, Prepared] | None = None,
    ) -> BatchOutcome:
        """Bring ``image_ids`` to a final state; ``owner`` (a task id) may re-take its own leases.

        ``predecoded``: decodes by path made when the files were registered
        (:meth:`DecodePool.predecode`); used where the path and content hash still match."""
        self.owner = owner or self.default_owner
        counts: Counter = Counter()
        #: The outcomes of this call's finished batches, while it runs (an interrupted scan reports them).
        self.in_flight = counts
        retry: list[int] = []
        # Overlap: later batches decode in the pool while batch k is claimed, scored and stored. A
        # batch is claimed only once its decodes are done and the model is loaded, so decoding ahead
        # holds no lease; before the model is loaded every batch of this call is handed to the pool.
        unfinished: list[_Started] = []

        def start(batch: list[int]) -> _Started:
            unfinished.append(started := self._start_batch(batch, predecoded or {}))
            return started

        batches = self._batches(list(image_ids))
        ahead = DECODE_AHEAD_BATCHES if self._scorer is not None else max(len(batches), 1)
        try:
            for started in prefetched((start(batch) for batch in batches), ahead=ahead):
                outcome = self._finish_batch(started)
                unfinished.remove(started)
                counts.update(outcome.counts)
                retry.extend(outcome.retry_later)
        finally:
            for started in unfinished:  # an error or interrupt: their decodes are not needed
                if started.pending is not None:
                    started.pending.cancel()
        self.in_flight = Counter()
        return BatchOutcome(counts, retry)

    def _release(self, claimed: list[int]) -> None:
        """Hand claimed images back to the queue, uncounted (not a death of this process)."""
        if claimed:
            with session_scope(self.database_url) as session:
                queue.release(session, claimed)

    def rescore(self, image_ids: Sequence[int]) -> int:
        """Add this model's score to scored films that lack one (a new model version). The image stays
        ``scored`` throughout (the worklist keeps showing it); nothing is claimed, and writing the
        same score twice leaves one row, so an interrupted or repeated re-score is harmless."""
        scorer = self.scorer
        with session_scope(self.database_url) as session:
            ids = [i for i in queue.outdated_ids_among(session, scorer.version, image_ids)]
            paths = queue.source_paths(session, ids)
            known = {row.id: row for row in session.execute(_identity_query(ids))} if ids else {}
        located = {i: _locate(paths.get(i, []))[0] for i in ids}
        todo = [i for i in ids if located[i]]
        jobs = [(located[i], known[i].sha256) for i in todo]
        scope = ScopePolicy.from_metadata(scorer.metadata)
        prepared = dict(
            zip(
                todo,
                self.pool.prepare_many(jobs, scorer.input_plan, scope, self.full_resolution_decode),
                strict=True,
            )
        )
        ready = [i for i in todo if prepared[i].tensor is not None]
        if not ready:
            return 0
        scores = scorer.score_batch(np.stack([prepared[i].tensor for i in ready]))
        with session_scope(self.database_url) as session:
            self._thresholds = self._thresholds_by_site(session, {known[i].site for i in ready})
            for image_id, score in zip(ready, scores, strict=True):
                queue.add_score(session, image_id, self._score_record(score, known[image_id].site))
        log.info("re-scored %d film(s) with model %s", len(ready), scorer.version)
        return len(ready)

    def _score_record(self, score, site: str) -> queue.ScoreRecord:
        """The score with the thresholds in force at the film's site (its calibration's, read per batch)."""
        scorer = self.scorer
        screening, high_confidence = self._thresholds.get(site) or (
            scorer.screening_threshold,
            scorer.high_confidence_threshold,
        )
        return queue.ScoreRecord(
            model_version=scorer.version,
            pneumonia_probability=float(score.pneumonia_probability),
            pneumonia_logit=float(score.pneumonia_logit),
            viral_probability=None if score.viral_probability is None else float(score.viral_probability),
            screening_threshold=screening,
            high_confidence_threshold=high_confidence,
        )

    def _batches(self, image_ids: list[int]) -> list[list[int]]:
        """Fresh images go in full batches; images whose earlier attempt was interrupted go alone,
        so that a file that kills its worker cannot take innocent batch-mates down with it."""
        with session_scope(self.database_url) as session:
            attempts = queue.attempts_of(session, image_ids)
        fresh = [i for i in image_ids if attempts.get(i, 0) == 0]
        retried = [[i] for i in image_ids if attempts.get(i, 0) > 0]
        size = self.batch_size
        return [fresh[s : s + size] for s in range(0, len(fresh), size)] + retried

    def _process_batch(self, image_ids: list[int]) -> BatchOutcome:
        return self._finish_batch(self._start_batch(image_ids))

    def decode_plan(self) -> tuple[InputPlan, ScopePolicy]:
        """Input plan (size, lung crop) and scope for decoding: the loaded model's, or its metadata
        file's while the model is not loaded yet (so that decoding can start first). A folder whose
        metadata cannot be read loads the model here, which fails with the model's own reason."""
        if self._scorer is None:
            from pipeline.inference import METADATA_FILE

            try:
                metadata = json.loads((Path(self.model_dir) / METADATA_FILE).read_text())
                return InputPlan.from_metadata(self.model_dir, metadata), ScopePolicy.from_metadata(metadata)
            except (OSError, ValueError, KeyError, TypeError):
                pass
        scorer = self.scorer
        return scorer.input_plan, ScopePolicy.from_metadata(scorer.metadata)

    def _start_batch(
        self, image_ids: list[int], predecoded: Mapping[str, Prepared] | None = None
    ) -> _Started:
        """Hand the batch's files to the decode pool; returns before they are decoded, claims nothing.

        Files decoded when they were registered (``predecoded``, by path) are not decoded again when
        the path and the content hash still match. Without decode processes nothing is decoded
        here: see :meth:`_finish_batch`."""
        plan, scope = self.decode_plan()
        with session_scope(self.database_url) as session:
            paths = queue.source_paths(session, image_ids)
            known = {row.id: row for row in session.execute(_identity_query(image_ids))} if image_ids else {}
        located = {image_id: _locate(paths.get(image_id, [])) for image_id in known}
        todo = [image_id for image_id in image_ids if image_id in known and located[image_id][0]]
        cached = _matching(predecoded or {}, todo, located, known)
        started = _Started(image_ids, located, known, todo, None, plan, cached=cached)
        jobs = [(located[i][0], known[i].sha256) for i in started.to_decode]
        if jobs and self.pool.workers > 0:
            started.pending = self.pool.submit(jobs, plan, scope, self.full_resolution_decode)
        return started

    def _finish_batch(self, started: _Started) -> BatchOutcome:
        """Wait for the batch's decodes, claim it, score it in one model call, store every outcome.

        The model is loaded (and a broken one refused) before anything is claimed. A decode child
        cannot take this process down, so its batch is claimed after decoding (no lease held while
        decoding) unless ``claim_before_decode``; a file decoded in this process is claimed first, so
        that one which kills the process counts as an interrupted attempt (and is failed after
        ``queue.MAX_ATTEMPTS``)."""
        scorer = self.scorer
        decoding_elsewhere = started.pending is not None or not started.to_decode  # not in this process
        decode_first = decoding_elsewhere and not self.claim_before_decode
        decoded = self._decoded(scorer, started, started.todo) if decode_first else None
        claimed = self._claim(started)
        if not claimed:  # taken by another worker, or failed for too many attempts
            if started.pending is not None:
                started.pending.cancel()
            return BatchOutcome(started.counts, [])
        try:
            if decoded is None:  # claimed first: decoding under the claim, released on any error
                taken = set(claimed)
                decoded = self._decoded(scorer, started, [i for i in started.todo if i in taken])
            return self._score_claimed(scorer, started, decoded)
        except BaseException:
            self._release(claimed)
            raise

    def _decoded(self, scorer, started: _Started, image_ids: list[int]) -> dict[int, Prepared]:
        """Decodes of ``image_ids`` (among the batch's): made at registration, the pool's, or made
        now at the model's size."""
        decoded: dict[int, Prepared] = {}
        if started.plan == scorer.input_plan:
            decoded.update(started.cached)
            if started.pending is not None:
                decoded.update(zip(started.to_decode, started.pending.results(), strict=True))
        # decoding in this process, or the metadata file disagreed with the loaded model
        rest = [i for i in image_ids if i not in decoded]
        if rest:
            jobs = [(started.located[i][0], started.known[i].sha256) for i in rest]
            scope = ScopePolicy.from_metadata(scorer.metadata)
            redone = self.pool.prepare_many(jobs, scorer.input_plan, scope, self.full_resolution_decode)
            decoded.update(zip(rest, redone, strict=True))
        return decoded

    def _claim(self, started: _Started) -> list[int]:
        with session_scope(self.database_url) as session:
            claimed, exhausted = queue.claim(
                session, [i for i in started.image_ids if i in started.known], self.lease_seconds, self.owner
            )
        started.claimed = claimed
        if exhausted:
            started.counts[Outcome.FAILED] += len(exhausted)
        metrics.claimed(started.known[i].first_seen_at for i in claimed)
        for image_id in exhausted:
            log.warning("image %s failed: interrupted %d times", image_id, queue.MAX_ATTEMPTS)
            metrics.outcome("failed", reason="interrupted")
        return claimed

    def _score_claimed(self, scorer, started: _Started, decoded: dict[int, Prepared]) -> BatchOutcome:
        claimed, located, known, counts = started.claimed, started.located, started.known, started.counts
        taken = set(claimed)
        todo = [image_id for image_id in started.todo if image_id in taken]
        prepared = {image_id: decoded[image_id] for image_id in todo}
        metrics.decoded(prepared.values())
        ready = [image_id for image_id in todo if prepared[image_id].tensor is not None]
        stacked = np.stack([prepared[i].tensor for i in ready]) if ready else None
        scores = metrics.timed_inference(scorer.score_batch, stacked) if ready else []
        score_of = dict(zip(ready, scores, strict=True))
        retry: list[int] = []
        back: list[int] = []  # not final: released to the queue
        scored: list[tuple[int, queue.ScoreRecord, dict | None]] = []  # written together below
        with session_scope(self.database_url) as session:
            sites = {known[i].site for i in claimed}
            self._thresholds = self._thresholds_by_site(session, sites) if scores else {}
            for image_id in claimed:
                outcome = self._store(
                    session,
                    image_id,
                    located[image_id],
                    prepared.get(image_id),
                    score_of.get(image_id),
                    known[image_id],
                    scored,
                )
                metrics.outcome(outcome, prepared.get(image_id), known[image_id].first_seen_at)
                if outcome is Outcome.RETRY:
                    retry.append(image_id)
                else:
                    counts[outcome] += 1
                if outcome in (Outcome.RETRY, Outcome.UNREACHABLE):
                    back.append(image_id)
            duplicates = queue.record_scores(session, scored)  # later copies of a scored SOP instance
            if duplicates:
                counts[Outcome.SCORED] -= len(duplicates)
                counts[Outcome.REJECTED] += len(duplicates)
            for image_id, _, attributes in scored:  # after the scores: a key object needs its score
                if image_id not in duplicates:  # (the outbox's SOP instance key would refuse them too)
                    outbox.enqueue_results(
                        session, image_id, self.scorer.version, self.outbox_plan, attributes
                    )
            queue.release(session, back)
        return BatchOutcome(counts, retry)

    def _store(
        self,
        session,
        image_id: int,
        located: tuple[str | None, bool],
        prepared: Prepared | None,
        score,
        known,
        scored: list[tuple[int, queue.ScoreRecord, dict | None]],
    ) -> Outcome:
        """The outcome of one claimed film, written in this transaction; a score is appended to
        ``scored`` for the caller to write with the batch's others (:func:`db.queue.record_scores`)."""
        tag = short(known.sha256)
        path, unreachable = located
        if path is None and unreachable:
            log.info("%s cannot be reached now (permission or share); left queued", tag)
            return Outcome.UNREACHABLE
        if path is None:
            queue.record_gone(session, image_id)
            log.info("%s superseded: no longer at any known path", tag)
            return Outcome.SUPERSEDED
        assert prepared is not None
        if score is not None and score.out_of_distribution:  # OOD guard (pipeline.ood): never ranked
            from pipeline.ood import REASON

            reason = score.ood_reason or REASON  # not a chest film, or a turned / inverted one
            queue.record_problem(session, image_id, ImageStatus.REJECTED, reason, prepared.attributes)
            log.debug("%s rejected: out of distribution (distance %.1f)", tag, score.ood_distance)
            return Outcome.REJECTED
        if score is not None:
            scored.append((image_id, self._score_record(score, known.site), prepared.attributes))
            log.debug("%s scored %.3f", tag, score.pneumonia_probability)
            return Outcome.SCORED
        if is_transient(prepared.reason):
            log.info("%s could not be read just now; left queued", tag)
            return Outcome.UNREACHABLE
        if prepared.incomplete and self.retry_incomplete and self._within_grace(known.first_seen_at):
            log.debug("%s looks incomplete (still being written?); will retry", tag)
            return Outcome.RETRY
        outcome = Outcome.of_status(prepared.status)
        queue.record_problem(
            session, image_id, ImageStatus(outcome.value), prepared.reason or "unknown", prepared.attributes
        )
        log.debug("%s %s: %s", tag, outcome, prepared.reason)
        return outcome

    def _thresholds_by_site(self, session, sites: set[str]) -> dict[str, tuple[float, float]]:
        """Each site's calibration in force (its own, else the one for every site; issues 12 and 29),
        read per batch: a calibration takes effect without a restart."""
        from db.calibration import ShippedThresholds, thresholds_by_site

        scorer = self.scorer
        shipped = ShippedThresholds(
            scorer.version, scorer.screening_threshold, scorer.high_confidence_threshold
        )
        return thresholds_by_site(session, shipped, sites)

    def _within_grace(self, first_seen_at) -> bool:
        return (utcnow() - as_utc(first_seen_at)).total_seconds() < self.incomplete_grace_s


def _matching(
    predecoded: Mapping[str, Prepared], todo: list[int], located: dict, known: dict
) -> dict[int, Prepared]:
    """The registration-time decodes still valid: same path found now, same content hash."""
    matches: dict[int, Prepared] = {}
    for image_id in todo:
        prepared = predecoded.get(located[image_id][0])
        if prepared is not None and prepared.sha256 == known[image_id].sha256:
            matches[image_id] = prepared
    return matches


def _identity_query(image_ids: list[int]):
    return select(Image.id, Image.sha256, Image.first_seen_at, Image.site).where(Image.id.in_(image_ids))


def _locate(paths: list[str]) -> tuple[str | None, bool]:
    """The first readable regular file among ``paths``, and whether any path failed for a passing
    reason (no permission, a share that is gone or hangs): then the image waits, it is not final."""
    unreachable = False
    for stored in paths:
        for candidate in from_db(stored):
            try:
                info = os.stat(candidate)
                if stat.S_ISREG(info.st_mode):
                    os.close(os.open(candidate, os.O_RDONLY | os.O_NONBLOCK))
                    return candidate, False
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                unreachable = unreachable or exc.errno in TRANSIENT_ERRNOS
    return None, unreachable
