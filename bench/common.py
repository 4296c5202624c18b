"""What every benchmark script shares: its command line, the product CLI it drives, the model under test.

The rest lives by concern: ``bench.corpus`` (generated films), ``bench.processes`` (process trees,
RSS, timed runs; psutil), ``bench.results`` (machine, revision, contention, RESULTS.md, scan
summaries) and ``bench.databases`` (throw-away PostgreSQL/SQLite/Redis databases).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import databases, results

VENV_BIN = Path(sys.executable).parent
CLI = str(VENV_BIN / "cxr-triage") if (VENV_BIN / "cxr-triage").exists() else "cxr-triage"


def cli(*args: str) -> list[str]:
    """Command line of the product CLI (the one next to this Python, else the one on PATH)."""
    return [CLI, *args]


def console_script(code: Path, folder: Path) -> str:
    """Another checkout's ``cxr-triage``, written into ``folder`` as pip writes a console script from
    that checkout's ``[project.scripts]`` entry. An A/B run must start as an install of that code
    starts: each spawned decode process re-imports this script, and so its entry module."""
    import tomllib

    entry = tomllib.loads((code / "pyproject.toml").read_text())["project"]["scripts"]["cxr-triage"]
    module, function = entry.split(":")
    script = folder / f"cxr-triage-{code.name}"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\n"
        f"if __name__ == '__main__':\n    sys.argv[0] = sys.argv[0].removesuffix('.exe')\n    sys.exit({function}())\n"
    )
    script.chmod(0o755)
    return str(script)


def scan_cli(summary_json: Path, *args: str, program: str | None = None) -> list[str]:
    """``cxr-triage scan ARGS --summary-json FILE``: read the outcome with results.read_scan_summary.
    ``program`` replaces this venv's ``cxr-triage`` (see :func:`console_script`)."""
    summary_json.unlink(missing_ok=True)
    command = cli("scan", *args, "--summary-json", str(summary_json))
    return [program or command[0], *command[1:]]


def store_args(database_url: str, *, broker: bool = False) -> list[str]:
    """``--database-url URL [--broker-url REDIS] --log-level WARNING``: where a product run keeps its
    state (with ``broker``, queueing on the benchmarks' Redis), logging only what goes wrong."""
    broker_args = ["--broker-url", databases.REDIS_URL] if broker else []
    return ["--database-url", database_url, *broker_args, "--log-level", "WARNING"]


def upgrade_schema(database_url: str, model_dir: Path) -> None:
    """Create the schema before the measured run, so nothing measured races the product's migration."""
    env = dict(os.environ, **bench_env(model_dir))
    subprocess.run(
        cli("db", "upgrade", "--database-url", database_url), check=True, capture_output=True, env=env
    )


def start_product(cmd: list[str], model_dir: Path) -> subprocess.Popen[str]:
    """Start a product command in the background: output dropped, stderr (text) for the caller to read."""
    env = dict(os.environ, **bench_env(model_dir))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def bench_env(model_dir: Path) -> dict[str, str]:
    """Environment for product subprocesses: the model under test, quiet TensorFlow."""
    return {"CXR_TRIAGE_MODEL_DIR": str(model_dir), "TF_CPP_MIN_LOG_LEVEL": "2"}


def resolve_model_dir(model_dir: str | None) -> Path:
    if model_dir:
        return Path(model_dir).resolve()
    if os.environ.get("CXR_TRIAGE_MODEL_DIR"):
        return Path(os.environ["CXR_TRIAGE_MODEL_DIR"]).resolve()
    from models import default_model_dir

    return default_model_dir()


def model_under_test(args: argparse.Namespace) -> tuple[Path, str]:
    """The model folder the benchmark runs (``--model-dir``, else the environment, else the shipped
    model) and its description for the results."""
    model_dir = resolve_model_dir(args.model_dir)
    return model_dir, results.model_description(model_dir)


class BenchParser(argparse.ArgumentParser):
    """An argument parser that opens the contention window once the arguments are parsed.

    Parsing itself neither sleeps nor looks at other processes, so ``--help`` is instant.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._quick_sizes: dict[str, float] = {}

    def add_size(self, flag: str, default: float, quick: float, what: str) -> None:
        """A size of the run (files, seconds ...), ``default`` unless given; ``--quick`` caps it at ``quick``."""
        action = self.add_argument(
            flag,
            type=type(default),
            default=default,
            help=f"{what} (default {default:g}; --quick: {quick:g})",
        )
        self._quick_sizes[action.dest] = quick

    def parse_with_model(self, args=None) -> tuple[argparse.Namespace, Path, str]:
        """:meth:`parse_args`, then the model under test (:func:`model_under_test`): folder, description."""
        parsed = self.parse_args(args)
        return (parsed, *model_under_test(parsed))

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed = super().parse_args(args, namespace)
        if getattr(parsed, "quick", False):
            for dest, quick in self._quick_sizes.items():
                setattr(parsed, dest, min(getattr(parsed, dest), quick))
        results.run_started()
        return parsed


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-dir", default=None, help="model folder (default: the shipped model models/shipped)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes, for development (figures are meaningless)"
    )
    parser.add_argument(
        "--no-append", action="store_true", help="print figures but do not write bench/RESULTS.md"
    )


def make_parser(doc: str, *, common_args: bool = True) -> BenchParser:
    """The parser every benchmark uses: first docstring line as description, the rest as epilog."""
    parser = BenchParser(
        description=doc.splitlines()[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if common_args:
        add_common_args(parser)
    return parser
