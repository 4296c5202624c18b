"""The Celery application (Redis broker, no result backend: results live in the database).

Delivery is at-least-once: ``task_acks_late`` with prefetch 1 means a message is
acknowledged only after its batch is stored, so a worker killed mid-batch leaves
the message to be delivered again; the database makes the second delivery
harmless (claims are conditional, scores are unique per image and model).
"""

from __future__ import annotations

import os

from celery import Celery

from db.engine import default_database_url
from worker.settings import env

#: Seconds before Redis hands an unacknowledged message to another worker; longer than any batch.
VISIBILITY_TIMEOUT_S = int(env("VISIBILITY_TIMEOUT", "3600"))
SCORE_QUEUE = "cxr-score"


def broker_url() -> str:
    return env("BROKER_URL") or "redis://127.0.0.1:6379/0"


def database_url() -> str:
    return env("DATABASE_URL") or default_database_url()


def make_app() -> Celery:
    celery = Celery("cxr_triage", broker=broker_url(), include=["worker.tasks"])
    celery.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=SCORE_QUEUE,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        # Task events on, so Flower (`celery -A worker.celery_app flower`) and exporters can follow work.
        worker_send_task_events=True,
        task_send_sent_event=True,
        enable_utc=True,
    )
    return celery


app = make_app()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
