"""Design rules that keep the layers honest."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Which first-party packages each package may import (worker -> models, db, pipeline; models -> pipeline).
#: ``bench`` (not installed) may import anything; nothing installed may import ``bench`` or ``tests``.
ALLOWED = {
    "pipeline": {"pipeline"},
    "db": {"db"},
    "models": {"models", "pipeline"},
    "worker": {"worker", "models", "db", "pipeline"},
    "bench": {"bench", "worker", "models", "db", "pipeline", "tests"},
}
FIRST_PARTY = set(ALLOWED) | {"tests"}


def _first_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & FIRST_PARTY


def test_dependencies_point_one_way():
    wrong = []
    for package, allowed in ALLOWED.items():
        for source in (REPO / package).rglob("*.py"):
            for imported in _first_party_imports(source) - allowed:
                wrong.append(f"{source.relative_to(REPO)} imports {imported}")
    assert wrong == []


def test_the_wheel_holds_no_bench_or_tests():
    """The installed packages are exactly the four product layers (bench/ and tests/ stay in the checkout)."""
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["packages"]["find"]["include"] == ["pipeline*", "models*", "db*", "worker*"]
    assert not any(key.startswith(("bench", "tests")) for key in config.get("package-data", {}))


def test_installed_code_assumes_no_checkout():
    """No product module builds paths from the repository root (site-packages after ``pip install``)."""
    wrong = []
    for package in ("pipeline", "models", "db", "worker"):
        for source in (REPO / package).rglob("*.py"):
            text = source.read_text()
            if "parents[1]" in text or "REPO_ROOT" in text or '"shared"' in text:
                wrong.append(str(source.relative_to(REPO)))
    assert wrong == []


def test_cli_and_supervisor_never_load_tensorflow():
    """TensorFlow is loaded in worker processes only, never in the CLI or the supervising parent."""
    code = (
        "import sys, worker.cli.app, worker.queue.supervisor, worker.queue.celery_app, worker.queue.tasks,"
        " worker.ingest.watcher;"
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False"
