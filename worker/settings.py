"""Settings shared by every command: flags first, then CXR_TRIAGE_* environment variables."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

from db.engine import default_database_url

ENV_PREFIX = "CXR_TRIAGE_"


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name, default)


def _default_model_dir() -> Path:
    from models import default_model_dir

    return default_model_dir()


@dataclass(frozen=True)
class Settings:
    database_url: str = field(default_factory=default_database_url)
    broker_url: str | None = None
    model_dir: Path | None = None
    batch_size: int = 32
    decode_workers: int = max((os.cpu_count() or 1), 1)
    #: Seconds a claimed image may stay in ``processing`` before another worker may take it.
    lease_seconds: float = field(default_factory=lambda: float(env("LEASE_SECONDS", "900")))
    #: Training/evaluation data: a folder with NORMAL/ and PNEUMONIA/ (``CXR_TRIAGE_DATA_DIR``). No
    #: default: the installed package cannot know where a checkout's data lives.
    data_dir: Path | None = field(default_factory=lambda: Path(env("DATA_DIR")) if env("DATA_DIR") else None)

    def resolved_model_dir(self) -> Path:
        return self.model_dir or _default_model_dir()


def local_owner() -> str:
    """Lease owner for in-process work (scan, watch): this host and process."""
    return f"{LOCAL_OWNER_PREFIX}{socket.gethostname()}:{os.getpid()}"


def local_owner_is_dead(owner: str) -> bool:
    """True when ``owner`` is a process of this host that no longer runs."""
    pid = owner.rsplit(":", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and not os.path.exists(f"/proc/{pid}")


def local_owner_prefix() -> str:
    return f"{LOCAL_OWNER_PREFIX}{socket.gethostname()}:"


LOCAL_OWNER_PREFIX = "local:"
