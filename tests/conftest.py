"""Shared fixtures: real data from ../shared, real SQLite/PostgreSQL/Redis servers."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_TRIAGE_SHARED", REPO.parent / "shared"))
KERMANY = SHARED / "data" / "kermany-cxr224" / "train"
DICOM_DIR = SHARED / "data" / "dicom"
PG_ADMIN_URL = os.environ.get("CXR_TRIAGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CXR_TRIAGE_TEST_REDIS", "redis://127.0.0.1:6379/14")


def _missing_service(what: str) -> None:
    # In CI the servers are started by .ci/run: a missing one is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not reachable")
    pytest.skip(f"{what} is not reachable")


@pytest.fixture(scope="session")
def kermany() -> Path:
    if not KERMANY.is_dir():
        pytest.skip("../shared/data/kermany-cxr224 is not present")
    return KERMANY


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    if not DICOM_DIR.is_dir():
        pytest.skip("../shared/data/dicom is not present")
    return DICOM_DIR


def kermany_files(root: Path, label: str, count: int) -> list[Path]:
    return sorted((root / label).glob("*.jpeg"))[:count]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'worklist.sqlite3'}"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:  # noqa: BLE001
        _missing_service("PostgreSQL at " + PG_ADMIN_URL)
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    from db import engine as db_engine

    for key, engine in list(db_engine._engines.items()):
        if key[1] == url:
            engine.dispose()
            del db_engine._engines[key]
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def redis_url() -> str:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError:
        _missing_service("Redis at " + REDIS_URL)
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from models import default_model_dir

    path = Path(os.environ.get("CXR_TRIAGE_MODEL_DIR") or default_model_dir())
    if not (path / "metadata.json").is_file():
        pytest.fail("the shipped model is missing from models/shipped")
    return path


@pytest.fixture(scope="session")
def scorer(model_dir):
    from pipeline.inference import Scorer

    return Scorer.load(model_dir)


def copy_into(files: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    copied = []
    for source in files:
        target = folder / source.name
        shutil.copyfile(source, target)
        copied.append(target)
    return copied


@pytest.fixture(scope="session", autouse=True)
def _pydicom_process_settings() -> None:
    """pydicom's process-wide settings, as every cxr-triage process entry applies them."""
    from pipeline.dicom import configure_pydicom

    configure_pydicom()
