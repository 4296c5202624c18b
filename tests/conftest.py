"""Shared fixtures: real data (../shared, else the sample in tests/data), real SQLite/PostgreSQL/Redis.

Two sets of tests:

* the **default set** runs from a bare clone: Kermany films from ``tests/data/kermany`` (a 64-film
  sample, see ``tests/data/README.md``) and DICOM from pydicom's own test files (installed with
  pydicom) plus synthetic radiographs written by ``tests/dicom_factory.py``;
* the **extended set** (``@pytest.mark.extended``) needs the full ``../shared/data`` (all 5,216
  training films, the 83-file DICOM corpus). Where it is absent these tests are deselected, with a
  line in the report header saying so; where it is present (``CXR_TRIAGE_SHARED``) everything runs
  and the default-set fixtures use the shared copies, which hold the same first files.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CXR_TRIAGE_SHARED", REPO.parent / "shared"))
KERMANY = SHARED / "data" / "kermany-cxr224" / "train"
DICOM_DIR = SHARED / "data" / "dicom"
SAMPLE = REPO / "tests" / "data"
KERMANY_SAMPLE = SAMPLE / "kermany"
#: The extended set runs only where the whole shared corpus is there.
SHARED_PRESENT = KERMANY.is_dir() and DICOM_DIR.is_dir()
PG_ADMIN_URL = os.environ.get("CXR_TRIAGE_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("CXR_TRIAGE_TEST_REDIS", "redis://127.0.0.1:6379/14")

#: The shared corpus folder whose files are pydicom's own test files (byte-identical, tested).
PYDICOM_FOLDER = "edge-cases__pydicom-testfiles"
#: Shared file names whose copy inside the pydicom package lives elsewhere than ``test_files/NAME``.
_PYDICOM_PLACES = {
    "dicomdirtests_CR1_6154": "test_files/dicomdirtests/77654033/CR1/6154",
    "dicomdirtests_CR2_6247": "test_files/dicomdirtests/77654033/CR2/6247",
    "chrJapMulti.dcm": "charset_files/chrJapMulti.dcm",
}
#: Roles the CLI and distributed tests need, and the shared file that plays each role.
DICOM_ROLES = {
    "chest_j2k": "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_J2KI.dcm",
    "chest_j2k_lossless": "nema-wg4-compsamples-RG1-RG3__pydicom-data-pypi/RG1_J2KR.dcm",
    "chest_mono1": "fo-dicom-testdata__dcmfx/CR-MONO1-10-chest.dcm",
    "chest_dx": "siim-acr-pneumothorax__mlmed-torchxrayvision/Fake_MONOHR1.dcm",
    "sr": f"{PYDICOM_FOLDER}/test-SR.dcm",
    "ct": f"{PYDICOM_FOLDER}/CT_small.dcm",
    "truncated": "edge-cases__pydicom-data-pypi/emri_small_jpeg_2k_lossless_too_short.dcm",
}


def pydicom_test_file(relative: str) -> Path | None:
    """The copy of a shared-corpus file that ships inside the installed pydicom package, if any."""
    folder, _, name = relative.partition("/")
    if folder != PYDICOM_FOLDER:
        return None
    import pydicom.data

    path = Path(pydicom.data.__file__).parent / _PYDICOM_PLACES.get(name, f"test_files/{name}")
    return path if path.is_file() else None


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "extended: needs the full ../shared/data (CXR_TRIAGE_SHARED); deselected where absent"
    )


def pytest_report_header(config) -> str:
    if SHARED_PRESENT:
        return f"data: {SHARED / 'data'} (default and extended sets)"
    return f"data: sample in tests/data; extended set deselected ({SHARED / 'data'} not found)"


def pytest_collection_modifyitems(config, items) -> None:
    if importlib.util.find_spec("tensorflow") is None:  # the serving install: no `train` extra
        skip = pytest.mark.skip(reason="needs TensorFlow: pip install '.[train]'")
        for item in items:
            if item.get_closest_marker("train"):
                item.add_marker(skip)
    if SHARED_PRESENT:
        return
    extended = [item for item in items if item.get_closest_marker("extended")]
    if extended:
        config.hook.pytest_deselected(items=extended)
        items[:] = [item for item in items if not item.get_closest_marker("extended")]


def _missing_service(what: str) -> None:
    # In CI the servers are started by .ci/run: a missing one is a failure, not a skip.
    if os.environ.get("CI"):
        pytest.fail(f"{what} is not reachable")
    pytest.skip(f"{what} is not reachable")


@pytest.fixture(scope="session")
def kermany() -> Path:
    """Kermany training films: the shared folder, else the sample (the same first files by name)."""
    return KERMANY if KERMANY.is_dir() else KERMANY_SAMPLE


@pytest.fixture(scope="session")
def dicom_dir(tmp_path_factory) -> Path:
    """The shared DICOM corpus, else a folder of pydicom's test files and synthetic radiographs."""
    if DICOM_DIR.is_dir():
        return DICOM_DIR
    folder = tmp_path_factory.mktemp("dicom")
    import pydicom.data

    root = Path(pydicom.data.__file__).parent
    places = {p.name: f"test_files/{p.name}" for p in (root / "test_files").glob("*.dcm")} | _PYDICOM_PLACES
    (folder / PYDICOM_FOLDER).mkdir()
    for name, place in places.items():
        shutil.copyfile(root / place, folder / PYDICOM_FOLDER / name)
    _synthetic_dicom(folder / SYNTHETIC_FOLDER)
    return folder


#: Synthetic stand-ins for the roles in DICOM_ROLES, under ``synthetic__tests-dicom_factory/``.
SYNTHETIC_FOLDER = "synthetic__tests-dicom_factory"
SYNTHETIC_ROLES = {
    "chest_j2k": "chest_j2k.dcm",
    "chest_j2k_lossless": "chest_j2k.dcm",
    "chest_mono1": "chest_mono1.dcm",
    "chest_dx": "chest_dx.dcm",
    "truncated": "chest_truncated.dcm",
}


def _synthetic_dicom(folder: Path) -> None:
    """Chest radiographs from sample films, written by tests/dicom_factory.py (out of scope on purpose:
    no age, an adult, no view), and one cut short."""
    from PIL import Image
    from pydicom.uid import JPEG2000Lossless

    from tests.dicom_factory import radiograph

    def stored(label: str, index: int) -> np.ndarray:
        path = kermany_files(KERMANY_SAMPLE, label, index + 1)[index]
        return np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 16

    folder.mkdir(parents=True, exist_ok=True)
    j2k = radiograph(stored("PNEUMONIA", 20), folder / "chest_j2k.dcm", age=None, syntax=JPEG2000Lossless)
    radiograph(4095 - stored("NORMAL", 10), folder / "chest_mono1.dcm", photometric="MONOCHROME1", age="045Y")
    radiograph(stored("PNEUMONIA", 21), folder / "chest_dx.dcm", modality="DX", view=None)
    (folder / "chest_truncated.dcm").write_bytes(j2k.read_bytes()[:4000])


@pytest.fixture(scope="session")
def dicom_samples(dicom_dir) -> dict[str, Path]:
    """One DICOM file per role (see DICOM_ROLES): shared files, else pydicom's and synthetic ones."""
    if dicom_dir == DICOM_DIR:
        return {role: DICOM_DIR / relative for role, relative in DICOM_ROLES.items()}
    return {
        role: dicom_dir / SYNTHETIC_FOLDER / SYNTHETIC_ROLES[role]
        if role in SYNTHETIC_ROLES
        else dicom_dir / relative
        for role, relative in DICOM_ROLES.items()
    }


def kermany_files(root: Path, label: str, count: int) -> list[Path]:
    return sorted((root / label).glob("*.jpeg"))[:count]


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'worklist.sqlite3'}"


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    from bench.databases import create_postgres, drop_postgres

    name = f"cxr_test_{uuid.uuid4().hex[:12]}"
    try:
        url = create_postgres(name, PG_ADMIN_URL)
    except Exception:  # noqa: BLE001
        _missing_service("PostgreSQL at " + PG_ADMIN_URL)
    yield url
    from db import engine as db_engine

    for key, engine in list(db_engine._engines.items()):
        if key[1] == url:
            engine.dispose()
            del db_engine._engines[key]
    drop_postgres(name, PG_ADMIN_URL)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.services)])
def url(request):
    """A migrated database of each kind in turn: SQLite, then a fresh PostgreSQL."""
    from db.migrate import upgrade

    value = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    upgrade(value)
    return value


def score_record(p: float, version: str = "m1"):
    """A score of probability ``p`` by model ``version``, thresholds 0.2 (screening) and 0.8 (high)."""
    from db.queue import ScoreRecord

    return ScoreRecord(version, p, 0.0, 0.3, screening_threshold=0.2, high_confidence_threshold=0.8)


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


#: The installed command line, next to this Python (the one the tests run against).
CLI = str(Path(sys.executable).parent / "cxr-triage")


def services_env(pg_url: str, redis_url: str, lease_seconds: float, **extra: str) -> dict[str, str]:
    """Environment of a ``cxr-triage`` child on the test PostgreSQL and Redis: one decode process,
    unbuffered output, ``extra`` variables last. Never the parent's PROMETHEUS_MULTIPROC_DIR: a child
    supervisor makes its own."""
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(
        CXR_TRIAGE_DATABASE_URL=pg_url,
        CXR_TRIAGE_BROKER_URL=redis_url,
        CXR_TRIAGE_LEASE_SECONDS=str(lease_seconds),
        CXR_TRIAGE_DECODE_WORKERS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def db_states(url: str) -> dict[str, int]:
    """How many images are in each status."""
    from sqlalchemy import func, select

    from db.engine import session_scope
    from db.schema import Image

    with session_scope(url) as session:
        return dict(session.execute(select(Image.status, func.count()).group_by(Image.status)).all())


def wait_final(url: str, expected: int, deadline_s: float) -> dict[str, int]:
    """Wait until at least ``expected`` images are known and all are final; fail after ``deadline_s``."""
    import time

    from db.schema import FINAL_STATUSES

    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        states = db_states(url)
        if sum(states.values()) >= expected and all(s in FINAL_STATUSES for s in states):
            return states
        time.sleep(1)
    pytest.fail(f"not all files final after {deadline_s} s: {db_states(url)}")


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A long-running ``cxr-triage`` command in its own process group, output appended to ``log``."""
    handle = open(log, "ab")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [CLI, *args], env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop_group(process: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the process group (warm shutdown), SIGKILL it after ``timeout`` seconds."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
