"""One settings object (issue 15 item 1): flags, environment, env file, children, README, --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CLI
from worker.settings import Settings, configuration_table, env_name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith("CXR_TRIAGE_"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_the_configuration_reference_is_generated_from_the_settings_class():
    """The docs site's configuration page (tools/docs_reference.py) lists every setting as it is."""
    from tools.docs_reference import configuration_markdown

    page = configuration_markdown()
    for name, field in Settings.model_fields.items():
        row = next(line for line in page.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"`CXR_TRIAGE_{name.upper()}`" in row and f"`--{name.replace('_', '-')}`" in row, row
        assert (field.description or "").replace("|", "\\|") in row, row


def test_the_cli_reference_is_generated_from_the_app():
    import typer

    from tools.docs_reference import cli_markdown
    from worker.cli.app import app

    page = cli_markdown()
    for name, command in typer.main.get_command(app).commands.items():
        assert f"## `cxr-triage {name}`" in page, name
        for sub in getattr(command, "commands", {}):
            assert f"### `cxr-triage {name} {sub}`" in page, (name, sub)
    assert "| `--summary-json` |" in page  # options with their help


def test_flags_win_over_environment_over_env_file(clean_env, tmp_path):
    env_file = tmp_path / "cxr.env"
    env_file.write_text("CXR_TRIAGE_BATCH_SIZE=8\nCXR_TRIAGE_LEASE_SECONDS=120\nCXR_TRIAGE_POLLING=true\n")
    clean_env.setenv("CXR_TRIAGE_ENV_FILE", str(env_file))
    clean_env.setenv("CXR_TRIAGE_LEASE_SECONDS", "300")
    built = Settings.build(batch_size=None, lease_seconds=None, decode_workers=3)
    assert (built.batch_size, built.lease_seconds, built.polling, built.decode_workers) == (8, 300.0, True, 3)
    assert Settings.build(batch_size=16).batch_size == 16


def test_a_child_rebuilds_the_same_settings_from_its_environment(clean_env, tmp_path):
    from worker.queue.supervisor import WorkerSpec, worker_env

    settings = Settings.build(
        database_url=f"sqlite:///{tmp_path / 'x.sqlite3'}",
        broker_url="redis://127.0.0.1:6379/9",
        batch_size=12,
        decode_workers=2,
        lease_seconds=77,
        full_resolution_decode=True,
        allowed_callers=["A", "B"],
    )
    child_env = worker_env(settings, WorkerSpec("cpu0", None))
    for name in [n for n in os.environ if n.startswith("CXR_TRIAGE_")]:
        clean_env.delenv(name)
    for name, value in child_env.items():
        if name.startswith("CXR_TRIAGE_"):
            clean_env.setenv(name, value)
    assert Settings.build() == settings


def test_celery_reads_nothing_at_import_and_has_no_default_broker(tmp_path):
    """The app is configured from Settings when first used, in the process that uses it."""
    code = (
        "import os, worker.queue.celery_app as c, worker.queue.tasks;"
        "os.environ['CXR_TRIAGE_BROKER_URL'] = 'redis://127.0.0.1:1/5';"
        "print(c.app.conf.broker_url)"
    )
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CXR_TRIAGE_")}
    result = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "redis://127.0.0.1:1/5"
    unset = subprocess.run(
        [sys.executable, "-c", "import worker.queue.celery_app as c; print(c.app.conf.broker_url)"],
        env=environ,
        capture_output=True,
        text=True,
    )
    assert unset.stdout.strip() == "None"  # not redis://127.0.0.1..., which contradicted "no broker"


COMMANDS = ["scan", "watch", "worker", "worklist", "review", "requeue", "db upgrade"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_each_options_environment_variable(command):
    result = subprocess.run(
        [CLI, *command.split(), "--help"],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert result.returncode == 0
    text = re.sub(r"[\s│]+", " ", result.stdout)  # undo rich's wrapping inside the option box
    flags = set(re.findall(r"(--[a-z][a-z-]+)", text))
    settings_flags = {"--" + name.replace("_", "-"): name for name in Settings.model_fields}
    used = [name for flag, name in settings_flags.items() if flag in flags]
    assert "database_url" in used
    for name in used:
        assert f"[env var: {env_name(name)}" in text, name


def test_bad_setting_in_the_environment_is_a_clear_usage_error(tmp_path):
    environ = {**os.environ, "CXR_TRIAGE_BATCH_SIZE": "many"}
    result = subprocess.run(
        [CLI, "scan", str(tmp_path), "--database-url", f"sqlite:///{tmp_path / 'w.sqlite3'}"],
        env=environ,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "CXR_TRIAGE_BATCH_SIZE" in result.stderr and "Traceback" not in result.stderr


def test_logs_go_to_stderr_so_json_output_parses(tmp_path):
    """Issue 15 item 8: `CXR_TRIAGE_LOG_LEVEL=DEBUG cxr-triage worklist --format json | jq` works."""
    environ = {
        **os.environ,
        "CXR_TRIAGE_LOG_LEVEL": "DEBUG",
        "CXR_TRIAGE_DATABASE_URL": f"sqlite:///{tmp_path / 'w.sqlite3'}",
    }
    result = subprocess.run(
        f"{CLI} db upgrade && "  # worklist reads an existing database only (issue 25 item 17)
        f"{CLI} worklist --format json | {sys.executable} -c 'import json, sys; print(json.load(sys.stdin))'",
        shell=True,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert "DEBUG" in result.stderr or "alembic" in result.stderr.lower()  # the logs went to stderr


def test_worklist_unknown_status_is_a_usage_error(tmp_path):
    result = subprocess.run(
        [CLI, "worklist", "--status", "bogus", "--database-url", f"sqlite:///{tmp_path / 'w.sqlite3'}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "bogus" in result.stderr


def test_configuration_table_lists_every_setting_once():
    table = configuration_table()
    for name in Settings.model_fields:
        assert table.count(f"`{env_name(name)}`") == 1
    assert json.dumps(Settings().as_environment())  # serialisable for children
