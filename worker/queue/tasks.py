"""Celery tasks. The settings, the model and the decode pool are created in the worker process.

The worker loads and checks its model when it starts, before it takes any message:
a worker that cannot load its model exits with :data:`EXIT_MODEL_UNUSABLE` and a
clear message, and its supervisor refuses to restart it (instead of claiming images
it can never score).
"""

from __future__ import annotations

import logging
import os
import sys

from celery.signals import worker_init, worker_process_shutdown

from worker import metrics
from worker.logs import describe_error
from worker.queue.celery_app import EXIT_MODEL_UNUSABLE, app
from worker.scoring.decode_pool import DecodePool
from worker.scoring.processing import Processor
from worker.settings import Settings, celery_owner

log = logging.getLogger(__name__)

_processor: Processor | None = None


def processor() -> Processor:
    """One processor per worker process, built after fork (TensorFlow and engines are per process)."""
    global _processor
    if _processor is None:
        settings = Settings.build()
        # decode processes started with the model load (worker_init), not at the first task
        pool = DecodePool(settings.decode_processes).start()
        _processor = Processor.from_settings(settings, pool, claim_before_decode=True)
        log.info("worker process %d ready (decode workers: %d)", os.getpid(), settings.decode_processes)
    return _processor


@worker_init.connect
def _load_model_first(**_kwargs) -> None:
    """Load the model before consuming: a broken model directory must not strand claimed images."""
    try:
        processor().scorer  # noqa: B018 - loads and checks the model
    except Exception as exc:  # noqa: BLE001 - any failure here means this worker cannot score
        sys.stderr.write(f"cxr-triage worker: cannot load the model: {describe_error(exc)}\n")
        sys.stderr.flush()
        os._exit(EXIT_MODEL_UNUSABLE)


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
        outcome = processor().process(image_ids, owner=celery_owner(self.request.id))
    except (OperationalError, DBAPIError) as exc:
        delay = min(2 ** min(self.request.retries, 6), MAX_BACKOFF_S)
        log.warning("database unavailable (%s); retrying this batch in %d s", describe_error(exc), delay)
        metrics.retried("database_unavailable", len(image_ids))
        raise self.retry(countdown=delay, exc=exc) from exc
    if outcome.retry_later:
        # Files still being written or briefly unreadable: try again shortly, as a new message.
        from worker.queue.submit import send_batches

        send_batches(processor().settings, outcome.retry_later, countdown=5)
    return {str(k): v for k, v in outcome.counts.items()}


@app.task(name="cxr_triage.rescore_images", bind=True, acks_late=True, max_retries=3)
def rescore_images(self, image_ids: list[int]) -> dict:
    """Add the current model's score to films scored by an older model (background, idempotent)."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    try:
        return {"rescored": processor().rescore(image_ids)}
    except (OperationalError, DBAPIError) as exc:
        raise self.retry(countdown=30, exc=exc) from exc
