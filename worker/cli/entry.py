"""The ``cxr-triage`` process entry (``[project.scripts]``): it imports nothing until :func:`main` runs.

Decode processes are started with ``spawn``, and a spawned child first re-imports the parent's main
module: for a console script, the script file, which imports the module named as its entry. With
:mod:`worker.cli.app` as the entry, every decode child loaded the whole CLI (Typer, Rich, SQLAlchemy,
pydantic, the schema: ~880 modules) before its first film, once per child and again after every
crash-restart. Through this module a child loads only what unpickling its work needs
(:mod:`worker.scoring.prepare` and the pipeline).
"""

from __future__ import annotations


def main() -> None:
    """Run the CLI (:func:`worker.cli.app.main`)."""
    from worker.cli.app import main as run_cli

    run_cli()
