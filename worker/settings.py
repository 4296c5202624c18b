"""The one settings object: every default lives here, once.

Precedence (highest first): command-line flags, ``CXR_TRIAGE_*`` environment
variables, an optional environment file (``CXR_TRIAGE_ENV_FILE``, the same
``KEY=value`` format systemd reads), then the defaults below. Each process
builds one :class:`Settings` at start (:meth:`Settings.build`) and passes it
down; a Celery child builds the same object from the same environment, which the
supervisor hands it (:meth:`Settings.as_environment`).

README's configuration table is rendered from this class
(:func:`configuration_table`) and a test checks that they agree.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from db.engine import default_database_url
from pipeline.model_folder import Engine

ENV_PREFIX = "CXR_TRIAGE_"
ENV_FILE_VARIABLE = ENV_PREFIX + "ENV_FILE"
#: The broker queue the scoring tasks go to (:mod:`worker.queue.celery_app`; its length is a readiness
#: gauge of :mod:`worker.metrics.server`, which does not import Celery for it).
SCORE_QUEUE = "cxr-score"


def _cores() -> int:
    return max(os.cpu_count() or 1, 1)


class Settings(BaseSettings):
    """Everything a cxr-triage process can be told. Field descriptions feed ``--help`` and README."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, extra="ignore", frozen=True, env_ignore_empty=True, populate_by_name=True
    )

    # -- where things are -------------------------------------------------------------------------
    database_url: str = Field(
        default_factory=default_database_url,
        description="SQLAlchemy URL of the worklist database (postgresql+psycopg://user@host/db); "
        "default: a SQLite file under $XDG_DATA_HOME/cxr-triage",
    )
    broker_url: str | None = Field(
        None, description="Celery broker (redis://host:6379/0); without one, work is done in-process"
    )
    model_dir: Path | None = Field(
        None, description="Model folder (metadata.json + weights); default: the shipped model"
    )
    data_dir: Path | None = Field(
        None, description="Training/evaluation data (kermany-cxr224 layout) for `model` commands"
    )
    log_level: str = Field("INFO", description="DEBUG shows every decision about every file (no identifiers)")

    # -- scoring ------------------------------------------------------------------------------------
    batch_size: int = Field(32, ge=1, le=512, description="Images per model call")
    decode_workers: int | None = Field(
        None, ge=0, description="Processes decoding in parallel; default one per core; 0 decodes in-process"
    )
    full_resolution_decode: bool = Field(
        False, description="Decode every film at full resolution (for checking the reduced decode)"
    )
    inference_engine: Engine = Field(
        Engine.AUTO,
        description="What runs the model: litert (CPU, no TensorFlow import: the model folder's export), "
        "tensorflow (the Keras model; GPUs), auto (litert on a CPU-only machine whose model folder ships "
        "a current export, else tensorflow)",
    )
    lease_seconds: float = Field(
        900.0, gt=0, description="A claimed file unfinished after this long is requeued (machine lost)"
    )
    visibility_timeout: int = Field(
        3600, gt=0, description="Seconds before Redis re-delivers an unacknowledged message"
    )

    # -- watching -----------------------------------------------------------------------------------
    stable_seconds: float = Field(
        2.0, ge=0, description="Without a close event, take a file once unchanged for this long"
    )
    batch_wait: float = Field(0.5, ge=0, description="Longest wait (s) for more files before a partial batch")
    rescan_interval: float = Field(300.0, gt=0, description="Seconds between reconciliation rescans")
    polling: bool = Field(False, description="Poll the drop folders instead of inotify (SMB/NFS shares)")
    follow_symlinks: bool = Field(False, description="Follow symbolic links while scanning (off: ignored)")

    # -- workers ------------------------------------------------------------------------------------
    processes: int = Field(1, ge=1, description="CPU worker processes (ignored when GPUs are used)")
    gpus: str | None = Field(
        None, description="Comma-separated GPU ids, one worker process each; default CUDA_VISIBLE_DEVICES"
    )
    cpu_only: bool = Field(False, description="Do not use GPUs even if present")

    # -- services -----------------------------------------------------------------------------------
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus /metrics, /healthz, /readyz here; off by default"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address /metrics binds to (0.0.0.0: a Prometheus on another host scrapes)"
    )
    min_free_disk_mb: float = Field(
        1024.0, ge=0, description="/readyz answers 503 when the database, drop or work disk has less free"
    )
    web_host: str = Field("127.0.0.1", description="Address the web worklist binds to")
    web_port: int = Field(8080, ge=0, le=65535, description="Port of the web worklist")
    viewer_url: str | None = Field(
        None,
        pattern=r"^https?://[^\s]*\{study_uid\}[^\s]*$",
        description="The hospital's image viewer, {study_uid} standing for the StudyInstanceUID "
        "(https://pacs.example/ohif/viewer?StudyInstanceUIDs={study_uid}): DICOM films link to their study",
    )
    dicom_port: int = Field(11112, ge=0, le=65535, description="Port of the DICOM Storage SCP (dicom-listen)")
    dicom_ae_title: str = Field("CXR_TRIAGE", max_length=16, description="AE title of the DICOM listener")
    dicom_bind_address: str = Field(
        "0.0.0.0", description="Address dicom-listen binds to (0.0.0.0: every interface)"
    )
    dicom_max_associations: int = Field(
        32, ge=1, le=1000, description="Associations dicom-listen serves at once (more are rejected)"
    )
    dicom_acse_timeout: float = Field(
        10.0, gt=0, description="Seconds a new DICOM connection may stay silent before it is closed"
    )
    dicom_network_timeout: float = Field(
        60.0, gt=0, description="Seconds of silence after which dicom-listen drops an association"
    )
    dicom_max_instance_mb: float = Field(
        512.0, gt=0, description="Largest instance dicom-listen keeps (MB); larger ones are answered 0xA700"
    )
    allowed_callers: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Calling AE titles accepted by dicom-listen (comma-separated); empty: any",
    )
    results_destination: str | None = Field(
        None, description="Send DICOM SR results to AET@host:port (scored DICOM films only)"
    )
    send_heatmap: bool = Field(False, description="Also send a Grad-CAM Secondary Capture (research only)")
    send_key_object: bool = Field(False, description="Also send a Key Object Selection flagging HIGH films")
    outbox_claim_lease_s: float = Field(120.0, gt=0, description="A dead sender's result is due after (s)")
    outbox_first_retry_s: float = Field(2.0, gt=0, description="First resend delay (s); doubles each time")
    outbox_max_retry_s: float = Field(60.0, gt=0, description="Longest wait (s) between resends of a result")
    outbox_max_attempts: int = Field(50, ge=1, description="Attempts to send a result before it is failed")

    @field_validator("allowed_callers", mode="before")
    @classmethod
    def _split_callers(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _upper(cls, value: str) -> str:
        return value.upper()

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def build(cls, **flags: Any) -> Settings:
        """Flags given on the command line (None = not given) over environment, env file, defaults."""
        given = {name: value for name, value in flags.items() if value is not None}
        env_file = os.environ.get(ENV_FILE_VARIABLE)
        return cls(_env_file=env_file, **given) if env_file else cls(**given)

    def with_changes(self, **changes: Any) -> Settings:
        return self.model_copy(update=changes)

    def resolved_model_dir(self) -> Path:
        if self.model_dir is not None:
            return self.model_dir
        from models import default_model_dir

        return default_model_dir()

    @property
    def decode_processes(self) -> int:
        """Decode processes to start: the setting, or one per core."""
        return _cores() if self.decode_workers is None else self.decode_workers

    def as_environment(self) -> dict[str, str]:
        """This object as ``CXR_TRIAGE_*`` variables, for child processes (None values left out)."""
        environ = {}
        for name, value in self.model_dump().items():
            if value is None or value == []:
                continue
            if isinstance(value, list):
                value = ",".join(value)
            elif isinstance(value, bool):
                value = "true" if value else "false"
            environ[ENV_PREFIX + name.upper()] = str(value)
        return environ


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def configuration_table() -> str:
    """README's configuration table (Markdown), rendered from :class:`Settings`."""
    rows = ["| flag | variable | default | meaning |", "|---|---|---|---|"]
    for name, info in Settings.model_fields.items():
        if info.default_factory is not None:
            default = "[]" if info.default_factory is list else "see meaning"
        else:
            default = "none" if info.default is None else str(info.default)
        rows.append(f"| `{flag_name(name)}` | `{env_name(name)}` | {default} | {info.description} |")
    return "\n".join(rows)


LOCAL_OWNER_PREFIX = "local:"


def local_owner() -> str:
    """Lease owner for in-process work (scan, watch): this host and process."""
    return f"{LOCAL_OWNER_PREFIX}{socket.gethostname()}:{os.getpid()}"


def local_owner_is_dead(owner: str) -> bool:
    """True when ``owner`` is a process of this host that no longer runs."""
    pid = owner.rsplit(":", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}")


def local_owner_prefix() -> str:
    return f"{LOCAL_OWNER_PREFIX}{socket.gethostname()}:"


CELERY_OWNER_PREFIX = "celery:"


def celery_owner_prefix(pid: int) -> str:
    """Lease owners of one Celery worker process: its supervisor releases them when it dies."""
    return f"{CELERY_OWNER_PREFIX}{socket.gethostname()[:150]}:{pid}:"


def celery_owner(task_id: str | None) -> str:
    """Lease owner for a task run by this worker process (a retry of the task re-takes its leases)."""
    return f"{celery_owner_prefix(os.getpid())}{task_id or '-'}"


def default_of(field_name: str) -> Any:
    """The default of a setting (for code that needs it without building Settings)."""
    return Settings.model_fields[field_name].get_default(call_default_factory=True)


if __name__ == "__main__":  # python -m worker.settings: print README's configuration table
    print(configuration_table())
