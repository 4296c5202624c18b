"""The Celery application (Redis broker, no result backend: results live in the database).

Delivery is at-least-once: ``task_acks_late`` with prefetch 1 means a message is
acknowledged only after its batch is stored, so a worker killed mid-batch leaves
the message to be delivered again; the database makes the second delivery
harmless (claims are conditional, scores are unique per image and model).

Nothing is read at import: the configuration comes from :class:`Settings` the
first time Celery needs it (a worker child builds it from the environment its
supervisor gave it; a sender calls :func:`configure` with its own settings).
There is no default broker: without one there is nothing to connect to.
"""

from __future__ import annotations

from celery import Celery

from worker.settings import SCORE_QUEUE, Settings

__all__ = ["SCORE_QUEUE", "EXIT_MODEL_UNUSABLE", "NoBrokerError", "app", "celery_config", "configure"]
#: Exit status of a worker process whose model cannot be loaded (EX_CONFIG): its supervisor stops.
EXIT_MODEL_UNUSABLE = 78


class NoBrokerError(RuntimeError):
    """Celery was asked to connect, but no broker is configured."""


def celery_config(settings: Settings) -> dict:
    """Celery's configuration from ``settings`` (the broker only when one is set)."""
    config = {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_default_queue": SCORE_QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        # Seconds before Redis hands an unacknowledged message to another worker; longer than any batch.
        "broker_transport_options": {"visibility_timeout": settings.visibility_timeout},
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_hijack_root_logger": False,
        # Task events on, so Flower (`celery -A worker.queue.celery_app flower`) and exporters can follow
        # work.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
    }
    if settings.broker_url:
        config["broker_url"] = settings.broker_url
    return config


app = Celery("cxr_triage", include=["worker.queue.tasks"])
# Lazy: evaluated on first access to app.conf, in the process that uses it, never at import.
app.add_defaults(lambda: celery_config(Settings.build()))


def configure(settings: Settings) -> Celery:
    """The app, pointed at ``settings``' broker (senders: scan, watch, the supervisor)."""
    if not settings.broker_url:
        raise NoBrokerError("no broker configured: set --broker-url or CXR_TRIAGE_BROKER_URL")
    app.conf.update(celery_config(settings))
    # A sender gives up after a few seconds when the broker is down (the caller says so clearly);
    # what was not sent stays unsent in the database and goes out on the next run.
    policy = {"max_retries": 2, "interval_start": 0.5, "interval_step": 1, "interval_max": 2}
    app.conf.update(task_publish_retry_policy=policy)
    return app
