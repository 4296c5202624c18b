"""Every cxr-triage metric, in one place (Prometheus conventions: ``cxr_triage_`` prefix, base
units, ``_total`` on counters).

Imported lazily by :mod:`worker.metrics`: prometheus_client decides at import time
whether values live in this process or in the multiprocess directory, so this module
must not be imported before :func:`worker.metrics.prepare_multiprocess` has set
``PROMETHEUS_MULTIPROC_DIR`` in a supervisor. No label ever carries a path, a patient
attribute or a UID: labels take values from the small fixed sets documented here.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREFIX = "cxr_triage_"

#: Label values (fixed sets).
SOURCE_FORMATS = ("dicom", "png", "jpeg", "unknown")
FINAL_STATUSES = ("scored", "rejected", "failed", "superseded")
QUEUE_STATUSES = ("queued", "processing")
TIERS = ("high", "screening", "below")
RETRY_CAUSES = ("incomplete_file", "database_unavailable")
DISK_ROLES = ("database", "drop_folder", "work")
DEPENDENCIES = ("database", "broker", "model", "disk")

# -- counters ---------------------------------------------------------------------------------------
FILES_SEEN = Counter(PREFIX + "files_seen", "Files found by a scan or the watcher (before deduplication)")
IMAGES = Counter(
    PREFIX + "images",
    "Images brought to a final state, by status and detected source format",
    ["status", "source_format"],
)
OUT_OF_SCOPE = Counter(
    PREFIX + "images_out_of_scope",
    "Scored images flagged out of the model's intended scope (age outside 1-5 years, no view)",
    ["source_format"],
)
FAILURES = Counter(
    PREFIX + "failures",
    "Images failed or rejected, by status and reason class (a short fixed set, never free text)",
    ["status", "reason_class"],
)
RETRIES = Counter(PREFIX + "retries", "Images or batches tried again later, by cause", ["cause"])
RESENT = Counter(PREFIX + "resent_images", "Images re-sent to the broker (lease expired or message lost)")
WORKER_RESTARTS = Counter(PREFIX + "worker_restarts", "Worker processes restarted by the supervisor")

# -- histograms -------------------------------------------------------------------------------------
_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_SLOW = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0)
DECODE_SECONDS = Histogram(
    PREFIX + "decode_seconds",
    "Decoding and normalising one file, by source format",
    ["source_format"],
    buckets=_FAST,
)
INFERENCE_SECONDS = Histogram(PREFIX + "inference_seconds", "One model call (a batch)", buckets=_FAST)
BATCH_SIZE = Histogram(
    PREFIX + "inference_batch_size", "Images per model call", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
)
DROP_TO_SCORE_SECONDS = Histogram(
    PREFIX + "drop_to_score_seconds", "From registration of a file to its stored score", buckets=_SLOW
)
QUEUE_WAIT_SECONDS = Histogram(
    PREFIX + "queue_wait_seconds", "From registration of a file to a worker claiming it", buckets=_SLOW
)

# -- gauges: per process, summed over live processes ------------------------------------------------
MODEL_LOADED = Gauge(PREFIX + "model_loaded", "Processes holding a loaded model", multiprocess_mode="livesum")

# -- gauges: set by the process that serves /metrics, just before it answers ------------------------


def _scrape_gauge(name: str, documentation: str, labels: tuple[str, ...] = ()) -> Gauge:
    """A gauge set by the serving process at each scrape: the most recent value is the value."""
    return Gauge(PREFIX + name, documentation, labels, multiprocess_mode="mostrecent")


WORKERS_ALIVE = _scrape_gauge("workers_alive", "Worker processes running under the supervisor")
QUEUE_DEPTH = _scrape_gauge("queue_depth", "Images waiting or in progress, from the database", ("status",))
BROKER_QUEUE_LENGTH = _scrape_gauge(
    "broker_queue_length", "Messages (batches) waiting in the broker's score queue"
)
OLDEST_UNREVIEWED_AGE = _scrape_gauge(
    "oldest_unreviewed_age_seconds",
    "Age of the oldest scored, unreviewed film per tier (0 when none)",
    ("tier",),
)
UNREVIEWED = _scrape_gauge("unreviewed_images", "Scored films not yet reviewed, per tier", ("tier",))
DISK_FREE = _scrape_gauge("disk_free_bytes", "Free space where this service writes, by role", ("role",))
DISK_SIZE = _scrape_gauge(
    "disk_size_bytes", "Size of the file system where this service writes, by role", ("role",)
)
DEPENDENCY_UP = _scrape_gauge(
    "dependency_up", "1 when a readiness check passed at the last scrape", ("dependency",)
)
SCRAPE_REFRESH_SECONDS = _scrape_gauge(
    "scrape_refresh_seconds", "Time spent computing the database gauges for this scrape"
)

# Per site, over the last 7 days (db/quality.py, issue 29). NaN while a value is undefined (no scored
# film, no calibration sample): it compares false in the alert rules.
SITE_FLAGGED = _scrape_gauge(
    "site_flagged_ratio",
    "Share of a site's films scored in the last 7 days at or above a threshold (screening or high)",
    ("site", "threshold"),
)
SITE_REVIEWED = _scrape_gauge(
    "site_reviewed_ratio",
    "Share of a site's films scored in the last 7 days that a reader reviewed",
    ("site",),
)
SITE_SCORE_PSI = _scrape_gauge(
    "site_score_psi",
    "Population stability index of a site's last 7 days of scores against its calibration sample",
    ("site",),
)
SITE_SCORE_KS_P = _scrape_gauge(
    "site_score_ks_p_value",
    "Two-sample Kolmogorov-Smirnov p-value of a site's last 7 days of scores against its calibration sample",
    ("site",),
)
SITE_SCORE_DRIFTED = _scrape_gauge(
    "site_score_drifted",
    "1 when a site's score distribution drifted from its calibration sample (rule: cxr-triage quality)",
    ("site",),
)
SITE_FILMS_7D = _scrape_gauge("site_films_7d", "Films registered at a site in the last 7 days", ("site",))
SITE_LAST_FILM_AGE = _scrape_gauge(
    "site_last_film_age_seconds", "Time since a site's newest film was registered", ("site",)
)

#: Rendered per scrape from the database (labels change with the calibration), not from a Gauge.
BUILD_INFO = PREFIX + "build_info"
