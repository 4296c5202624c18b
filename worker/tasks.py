"""Celery tasks. The model and the decode pool are created lazily in the worker process."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_shutdown

from worker.celery_app import app, database_url
from worker.decode_pool import DecodePool
from worker.dicomnet.plan import results_plan
from worker.logs import describe_error
from worker.processing import Processor
from worker.settings import Settings, env

log = logging.getLogger(__name__)

_processor: Processor | None = None


def processor() -> Processor:
    """One processor per worker process, built after fork (TensorFlow and engines are per process)."""
    global _processor
    if _processor is None:
        settings = Settings()
        model_dir = env("MODEL_DIR")
        decode_workers = int(env("DECODE_WORKERS", str(settings.decode_processes)))
        _processor = Processor(
            database_url(),
            model_dir or settings.resolved_model_dir(),
            DecodePool(decode_workers),
            batch_size=int(env("BATCH_SIZE", "32")),
            lease_seconds=float(env("LEASE_SECONDS", str(settings.lease_seconds))),
            retry_incomplete=True,
            outbox_plan=results_plan(settings),
        )
        log.info("worker process %d ready (decode workers: %d)", os.getpid(), decode_workers)
    return _processor


@worker_process_shutdown.connect
def _close_pool(**_kwargs) -> None:
    if _processor is not None:
        _processor.pool.close()


#: Seconds between retries while the database or broker is unreachable (capped exponential backoff).
MAX_BACKOFF_S = 60


@app.task(
    name="cxr_triage.score_images", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=None
)
def score_images(self, image_ids: list[int]) -> dict:
    """Score a batch of registered images; safe to run twice for the same ids."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        outcome = processor().process(image_ids, owner=self.request.id)
    except (OperationalError, DBAPIError) as exc:
        delay = min(2 ** min(self.request.retries, 6), MAX_BACKOFF_S)
        log.warning("database unavailable (%s); retrying this batch in %d s", describe_error(exc), delay)
        raise self.retry(countdown=delay, exc=exc) from exc
    if outcome.retry_later:
        # Files still being written: try again shortly, as a new message.
        score_images.apply_async(args=[outcome.retry_later], countdown=5)
    return dict(outcome.counts)
