"""Design rules that keep the layers honest."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: Which first-party packages each package may import (worker -> models, db, pipeline; models -> pipeline).
ALLOWED = {
    "pipeline": {"pipeline"},
    "db": {"db"},
    "models": {"models", "pipeline"},
    "worker": {"worker", "models", "db", "pipeline"},
}


def _first_party_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ALLOWED)


def test_dependencies_point_one_way():
    wrong = []
    for package, allowed in ALLOWED.items():
        for source in (REPO / package).rglob("*.py"):
            for imported in _first_party_imports(source) - allowed:
                wrong.append(f"{source.relative_to(REPO)} imports {imported}")
    assert wrong == []


def test_cli_and_supervisor_never_load_tensorflow():
    """TensorFlow is loaded in worker processes only, never in the CLI or the supervising parent."""
    code = (
        "import sys, worker.cli, worker.supervisor, worker.celery_app, worker.tasks, worker.watcher;"
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False"
