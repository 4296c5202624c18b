"""Celery tasks. The model and the decode pool are created lazily in the worker process."""

from __future__ import annotations

import logging
import os

from celery.signals import worker_process_shutdown

from worker.celery_app import app, database_url
from worker.decode_pool import DecodePool
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
        decode_workers = int(env("DECODE_WORKERS", str(settings.decode_workers)))
        _processor = Processor(
            database_url(),
            model_dir or settings.resolved_model_dir(),
            DecodePool(decode_workers),
            batch_size=int(env("BATCH_SIZE", "32")),
            lease_seconds=float(env("LEASE_SECONDS", str(settings.lease_seconds))),
            retry_incomplete=True,
        )
        log.info("worker process %d ready (decode workers: %d)", os.getpid(), decode_workers)
    return _processor


@worker_process_shutdown.connect
def _close_pool(**_kwargs) -> None:
    if _processor is not None:
        _processor.pool.close()


@app.task(name="cxr_triage.score_images", acks_late=True, reject_on_worker_lost=True)
def score_images(image_ids: list[int]) -> dict:
    """Score a batch of registered images; safe to run twice for the same ids."""
    outcome = processor().process(image_ids)
    if outcome.retry_later:
        # Files still being written: try again shortly, as a new message.
        score_images.apply_async(args=[outcome.retry_later], countdown=5)
    return dict(outcome.counts)
