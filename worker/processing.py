"""Claim a batch of images, decode them in parallel, score them in one model call, store results.

Shared by the embedded path (``scan``/``watch`` without a broker) and the Celery
tasks, so both give the same scores.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from db import queue
from db.engine import session_scope
from db.paths import from_db
from db.queue import as_utc
from db.schema import Image, ImageStatus, utcnow
from worker.decode_pool import DecodePool
from worker.logs import short
from worker.prepare import Prepared

log = logging.getLogger(__name__)


@dataclass
class BatchOutcome:
    counts: Counter
    retry_later: list[int]


class Processor:
    """Turns image ids into final states. The model is loaded on first use, in this process."""

    def __init__(
        self,
        database_url: str,
        model_dir,
        pool: DecodePool,
        *,
        batch_size: int = 32,
        lease_seconds: float = 900.0,
        retry_incomplete: bool = False,
        incomplete_grace_s: float = 600.0,
        owner: str | None = None,
    ) -> None:
        self.database_url = database_url
        self.model_dir = model_dir
        self.pool = pool
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.retry_incomplete = retry_incomplete
        #: How long after its arrival a file that looks incomplete is retried before it is failed.
        self.incomplete_grace_s = incomplete_grace_s
        self._scorer = None
        self._thresholds: tuple[float, float] | None = None  # of the active calibration, per batch
        #: Lease owner used when a call names none (in-process work); a Celery task passes its id.
        self.default_owner = owner
        self.owner: str | None = owner

    @property
    def scorer(self):
        if self._scorer is None:
            from pipeline.inference import Scorer

            self._scorer = Scorer.load(self.model_dir)
            log.info("model %s loaded (input %d px)", self._scorer.version, self._scorer.input_size)
        return self._scorer

    def process(self, image_ids: Sequence[int], owner: str | None = None) -> BatchOutcome:
        """Bring ``image_ids`` to a final state; ``owner`` (a task id) may re-take its own leases."""
        self.owner = owner or self.default_owner
        counts: Counter = Counter()
        retry: list[int] = []
        for batch in self._batches(list(image_ids)):
            outcome = self._process_batch(batch)
            counts.update(outcome.counts)
            retry.extend(outcome.retry_later)
        return BatchOutcome(counts, retry)

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
        counts: Counter = Counter()
        with session_scope(self.database_url) as session:
            claimed, exhausted = queue.claim(session, image_ids, self.lease_seconds, self.owner)
            paths = queue.source_paths(session, claimed)
            known = {row.id: row for row in session.execute(_identity_query(claimed))} if claimed else {}
        counts["failed"] += len(exhausted)
        for image_id in exhausted:
            log.warning("image %s failed: interrupted %d times", image_id, queue.MAX_ATTEMPTS)
        if not claimed:
            return BatchOutcome(counts, [])
        readable = {image_id: _first_existing(paths.get(image_id, [])) for image_id in claimed}
        todo = [image_id for image_id in claimed if readable[image_id]]
        jobs = [(readable[i], known[i].sha256) for i in todo]
        prepared = dict(zip(todo, self.pool.prepare_many(jobs, self.scorer.input_size), strict=True))
        ready = [image_id for image_id in todo if prepared[image_id].tensor is not None]
        scores = self.scorer.score_batch(np.stack([prepared[i].tensor for i in ready])) if ready else []
        score_of = dict(zip(ready, scores, strict=True))
        retry: list[int] = []
        with session_scope(self.database_url) as session:
            self._thresholds = self._thresholds_in_force(session) if scores else None
            for image_id in claimed:
                outcome = self._store(
                    session,
                    image_id,
                    readable[image_id],
                    prepared.get(image_id),
                    score_of.get(image_id),
                    known[image_id],
                )
                if outcome == "retry":
                    retry.append(image_id)
                else:
                    counts[outcome] += 1
            queue.release(session, retry, refund_attempt=True)
        return BatchOutcome(counts, retry)

    def _store(
        self, session, image_id: int, path: str | None, prepared: Prepared | None, score, known
    ) -> str:
        tag = short(known.sha256)
        if path is None:
            queue.record_problem(
                session, image_id, ImageStatus.FAILED, "file no longer exists at any known path"
            )
            log.info("%s failed: file gone", tag)
            return "failed"
        assert prepared is not None
        if score is not None and score.out_of_distribution:  # OOD guard (pipeline.ood): never ranked
            from pipeline.ood import REASON

            queue.record_problem(session, image_id, ImageStatus.REJECTED, REASON, prepared.attributes)
            log.debug("%s rejected: out of distribution (distance %.1f)", tag, score.ood_distance)
            return "rejected"
        if score is not None:
            scorer = self.scorer
            screening, high_confidence = self._thresholds or (
                scorer.screening_threshold,
                scorer.high_confidence_threshold,
            )
            queue.record_score(
                session,
                image_id,
                queue.ScoreRecord(
                    model_version=scorer.version,
                    pneumonia_probability=float(score.pneumonia_probability),
                    pneumonia_logit=float(score.pneumonia_logit),
                    viral_probability=None
                    if score.viral_probability is None
                    else float(score.viral_probability),
                    screening_threshold=screening,
                    high_confidence_threshold=high_confidence,
                ),
                prepared.attributes,
            )
            log.debug("%s scored %.3f", tag, score.pneumonia_probability)
            return "scored"
        if prepared.incomplete and self.retry_incomplete and self._within_grace(known.first_seen_at):
            log.debug("%s looks incomplete (still being written?); will retry", tag)
            return "retry"
        queue.record_problem(
            session, image_id, ImageStatus(prepared.status), prepared.reason or "unknown", prepared.attributes
        )
        log.debug("%s %s: %s", tag, prepared.status, prepared.reason)
        return prepared.status or "failed"

    def _thresholds_in_force(self, session) -> tuple[float, float]:
        """The active site calibration's thresholds (issue 12), read per batch: no restart needed."""
        from db.calibration import ShippedThresholds, thresholds_in_force

        scorer = self.scorer
        shipped = ShippedThresholds(
            scorer.version, scorer.screening_threshold, scorer.high_confidence_threshold
        )
        return thresholds_in_force(session, shipped)[1:]

    def _within_grace(self, first_seen_at) -> bool:
        return (utcnow() - as_utc(first_seen_at)).total_seconds() < self.incomplete_grace_s


def _identity_query(image_ids: list[int]):
    return select(Image.id, Image.sha256, Image.first_seen_at).where(Image.id.in_(image_ids))


def _first_existing(paths: list[str]) -> str | None:
    return next((c for stored in paths for c in from_db(stored) if os.path.isfile(c)), None)
