"""deploy/ and compose.yaml: what can be checked without a Docker engine or systemd as PID 1.

Checked: every service's command is a command of the CLI; the compose stack has each part and mounts
files that exist; its Prometheus configuration passes promtool; the image is the serving install; every
systemd unit runs a real command. Not checked here: that images build or containers start (no Docker
engine or registry in CI), nor that units start (.ci/check-systemd runs `systemd-analyze verify`).
"""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SERVICES = {"redis", "postgres", "migrate", "worker", "watch", "dicom-listen", "web", "prometheus", "grafana"}


def _cli_commands() -> dict:
    import typer

    from worker.cli.app import app

    return typer.main.get_command(app).commands


def _is_cli_command(args: list[str]) -> bool:
    group: dict = _cli_commands()
    for word in args:
        if word.startswith("-") or word not in group:
            break
        command = group[word]
        group = getattr(command, "commands", None)
        if group is None:
            return True
    return False


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "compose.yaml").read_text())


def test_compose_runs_the_whole_stack_from_the_serving_image(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    ours = {name: s for name, s in services.items() if s.get("image") == "cxr-triage:latest"}
    assert set(ours) == {"migrate", "worker", "watch", "dicom-listen", "web"}
    for name, service in ours.items():
        assert service["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}, name
        assert _is_cli_command(service["command"]), (name, service["command"])
        assert service["environment"]["CXR_TRIAGE_BROKER_URL"].startswith("redis://redis:"), name
        assert "@postgres:5432/" in service["environment"]["CXR_TRIAGE_DATABASE_URL"], name


def test_compose_mounts_files_that_exist(compose):
    for service in compose["services"].values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), source


def test_the_image_is_the_serving_install():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    installs = [line for line in dockerfile.splitlines() if "pip install" in line]
    assert installs and all("[" not in line for line in installs)  # no extra: no TensorFlow


def test_compose_prometheus_configuration_passes_promtool():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed; .ci/run installs it")
    done = subprocess.run(
        [promtool, "check", "config", "prometheus.compose.yml"],
        cwd=REPO / "deploy" / "prometheus",
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_systemd_service_runs_a_cli_command():
    units = sorted((REPO / "deploy" / "systemd").glob("*.service"))
    names = {unit.stem.removeprefix("cxr-triage-") for unit in units}
    assert names == {"worker", "watch", "web", "dicom-listen", "backlog"}
    for unit in units:
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(unit)
        args = shlex.split(parser["Service"]["ExecStart"])
        assert args[0] == "/opt/cxr-triage/venv/bin/cxr-triage" and _is_cli_command(args[1:]), unit.name
        assert parser["Service"]["ProtectSystem"] == "strict" and parser["Service"]["User"] == "cxr-triage"
    assert (REPO / "deploy" / "systemd" / "cxr-triage-backlog.timer").is_file()
