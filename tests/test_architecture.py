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
        "import sys, worker.cli.entry, worker.cli.app, worker.queue.supervisor, worker.queue.celery_app,"
        " worker.queue.tasks, worker.ingest.watcher;"
        "print('tensorflow' in sys.modules or 'keras' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.stdout.strip() == "False"


# -- the module graph of the product (issue 24) ------------------------------------------------------
PRODUCT = ("pipeline", "models", "db", "worker")
#: Plumbing every room of ``worker`` may use; it imports none of them.
PLUMBING = {"worker.settings", "worker.logs", "worker.outcomes"}
#: Which parts of ``worker`` each room may import (the most specific prefix applies; a module of a room
#: may always import its own room). Read top to bottom, a file's path: found and registered (ingest),
#: decoded, scored and stored (scoring), handed on in this process or through the broker (queue),
#: shown (web) and sent (dicomnet); the command line (cli) starts them all. See docs/architecture.md.
WORKER_ROOMS = {
    "worker": set(),  # worker/__init__.py
    **{module: PLUMBING for module in PLUMBING},
    "worker.metrics": PLUMBING,
    "worker.dicomnet": PLUMBING | {"worker.metrics"},
    "worker.web": PLUMBING | {"worker.metrics"},
    "worker.ingest": PLUMBING | {"worker.metrics"},
    # The watcher drives the flow: it shares scoring's decode pool and hands files on through the seam.
    "worker.ingest.watcher": PLUMBING
    | {"worker.metrics", "worker.ingest", "worker.scoring.decode_pool", "worker.queue.submit"},
    # Scoring reads each file once through ingest's hashing and stores what to send with the score.
    "worker.scoring": PLUMBING | {"worker.metrics", "worker.ingest.hashing", "worker.dicomnet.plan"},
    "worker.queue": PLUMBING | {"worker.metrics", "worker.ingest", "worker.scoring"},
    "worker.cli": {"worker"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _product_modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PRODUCT for path in (REPO / package).rglob("*.py")}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The product module that ``name`` (a module, or a name in a module) is found in, or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, modules: dict[str, Path]) -> dict[str, list[str]]:
    """Product modules that ``module`` imports -> the names it takes from each. Every import counts,
    at module level or inside a function, under TYPE_CHECKING or not; relative imports are resolved.
    ``from package import module`` is an import of that module."""
    path = modules[module]
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: dict[str, list[str]] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name, modules)
                if target:
                    found.setdefault(target, []).append(alias.name.rpartition(".")[2])
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                target = _resolve(f"{base}.{alias.name}", modules)
                if target:
                    found.setdefault(target, []).append(alias.name)
    found.pop(module, None)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _product_modules()
    return {module: set(_imports(module, modules)) for module in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, targets = work[-1]
            for target in targets:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_product():
    """No two product modules import each other, directly or round a loop (function-level imports
    included: deferring an import hides a cycle from Python, not from the design)."""
    assert _cycles(_graph()) == []


def _room_of(module: str) -> str:
    room = _resolve(module, WORKER_ROOMS)
    assert room is not None, f"{module}: add its room to WORKER_ROOMS (and docs/architecture.md)"
    return room


def test_worker_rooms_import_only_what_their_layer_allows():
    """The rooms of ``worker``: plumbing and metrics import no room; ingest, scoring, web and dicomnet
    never import the command line, each other's networking or the queue (the few seams named in
    WORKER_ROOMS excepted); only the command line imports the command line."""
    wrong = []
    for module, targets in _graph().items():
        if not module.startswith("worker"):
            continue
        room = _room_of(module)
        allowed = WORKER_ROOMS[room] | {room}
        for target in targets:
            if target.startswith("worker") and not any(
                target == prefix or target.startswith(prefix + ".") for prefix in allowed
            ):
                wrong.append(f"{module} imports {target}")
    assert sorted(wrong) == []


def test_only_the_command_line_imports_the_command_line():
    wrong = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if target.startswith("worker.cli") and not module.startswith("worker.cli")
    ]
    assert wrong == []


def test_no_private_names_imported_across_modules():
    """``from x import _y``, ``import x._y`` and ``x._y`` on an imported product module stay inside
    the module that defines ``_y``: what another module needs is public, in the module it belongs to."""
    modules = _product_modules()
    wrong = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        taken = _imports(module, modules)
        for target, names in taken.items():
            wrong += [
                f"{module} imports {target}.{n}" for n in names if n.startswith("_") and n[:2] != "__"
            ]
        bound = set()  # local names of imported product modules
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if _resolve(alias.name, modules) and alias.name.split(".")[0] in PRODUCT:
                        bound.add(alias.asname or alias.name.split(".")[0])
                        wrong += [
                            f"{module} imports {alias.name}"
                            for part in alias.name.split(".")
                            if part.startswith("_") and not part.startswith("__")
                        ]
            elif isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if node.module and f"{node.module}.{alias.name}" in modules:
                        bound.add(alias.asname or alias.name)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in bound
            ):
                wrong.append(f"{module} uses {node.value.id}.{node.attr}")
    assert sorted(set(wrong)) == []


_ENV_NAMES = {"ENV_PREFIX", "ENV_FILE_VARIABLE", "env_name"}


def _names_an_environment_variable(node: ast.AST) -> bool:
    """``node`` spells a CXR_TRIAGE_* variable: the literal name, or built from the settings' helpers."""
    for part in ast.walk(node):
        if (
            isinstance(part, ast.Constant)
            and isinstance(part.value, str)
            and part.value.startswith("CXR_TRIAGE_")
        ):
            return True
        if isinstance(part, ast.Name) and part.id in _ENV_NAMES:
            return True
        if isinstance(part, ast.Attribute) and part.attr in _ENV_NAMES:
            return True
    return False


def _reads_environment(node: ast.AST) -> ast.AST | None:
    """The key of ``os.environ[key]``, ``os.environ.get(key)``, ``os.getenv(key)`` (or ``environ.pop``,
    ``setdefault``), else None."""
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("environ"):
        return node.slice
    if isinstance(node, ast.Call) and node.args:
        called = ast.unparse(node.func)
        if called.endswith(("getenv", "environ.get", "environ.pop", "environ.setdefault")):
            return node.args[0]
    return None


def test_every_cxr_triage_variable_is_read_through_settings():
    """Only :mod:`worker.settings` reads ``CXR_TRIAGE_*`` variables (pydantic-settings): no Typer
    ``envvar=``, no ``os.environ``/``getenv`` of such a name, no bare variable name as a value (prose
    in help texts and docstrings may name them)."""
    wrong = []
    for module, path in _product_modules().items():
        if module == "worker.settings":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{module}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.keyword) and node.arg == "envvar":
                wrong.append(f"{where} envvar={ast.unparse(node.value)}")
            key = _reads_environment(node)
            if key is not None and _names_an_environment_variable(key):
                wrong.append(f"{where} reads {ast.unparse(node)}")
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and node.value.startswith("CXR_TRIAGE_")
                and node.value.replace("_", "").isalnum()
                and node.value.upper() == node.value
            ):
                wrong.append(f"{where} names {node.value!r}")
    assert sorted(set(wrong)) == []
