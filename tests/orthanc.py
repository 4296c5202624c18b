"""A real Orthanc PACS for tests: Debian's /usr/sbin/Orthanc with a temporary configuration.

Free loopback ports, its own storage and index folders, no plugins, no remote access. Orthanc 1.10
listens on every interface whatever HttpBindAddress says, so tests talk to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.ports import free_port

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
AE_TITLE = "ORTHANC"


def available() -> bool:
    return Path(ORTHANC).is_file()


class Orthanc:
    """Start/stop/restart one Orthanc; ``modalities`` maps a name to (AE title, port) on 127.0.0.1."""

    def __init__(self, folder: Path, modalities: dict[str, tuple[str, int]] | None = None) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config = self.folder / "orthanc.json"
        self.config.write_text(
            json.dumps(
                {
                    "Name": "cxr-triage-test",
                    "StorageDirectory": str(self.folder / "storage"),
                    "IndexDirectory": str(self.folder / "index"),
                    "HttpPort": self.http_port,
                    "HttpBindAddress": "127.0.0.1",
                    "DicomPort": self.dicom_port,
                    "DicomAet": AE_TITLE,
                    "RemoteAccessAllowed": False,
                    "AuthenticationEnabled": False,
                    "DicomCheckCalledAet": False,
                    "DicomAlwaysAllowStore": True,
                    "DicomAlwaysAllowEcho": True,
                    "StableAge": 1,
                    "Plugins": [],
                    "DicomModalities": {
                        name: [aet, "127.0.0.1", port] for name, (aet, port) in (modalities or {}).items()
                    },
                    "HttpTimeout": 30,
                }
            )
        )
        self.process: subprocess.Popen | None = None
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.destination = f"{AE_TITLE}@127.0.0.1:{self.dicom_port}"

    def start(self, timeout: float = 60.0) -> Orthanc:
        log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen([ORTHANC, str(self.config)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/system", timeout=2).status_code == 200 and self._dicom_open():
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("Orthanc did not start in time")

    def _dicom_open(self) -> bool:
        with socket.socket() as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", self.dicom_port)) == 0

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None

    # -- REST --------------------------------------------------------------------------------------
    def get(self, path: str, **params):
        response = httpx.get(self.url + path, params=params or None, timeout=30)
        response.raise_for_status()
        return response

    def post(self, path: str, body) -> httpx.Response:
        data = body if isinstance(body, bytes | str) else json.dumps(body)
        response = httpx.post(self.url + path, content=data, timeout=120)
        response.raise_for_status()
        return response

    def instances(self) -> list[dict]:
        return self.get("/instances", expand="true").json()

    def instance_file(self, orthanc_id: str) -> bytes:
        return self.get(f"/instances/{orthanc_id}/file").content

    def instances_of_study(self, study_uid: str) -> list[dict]:
        """Instances (with their tags) of the study with this StudyInstanceUID."""
        found = self.post(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
        ).json()
        return [self.get(f"/instances/{i}").json() for i in found]

    def upload(self, data: bytes) -> str:
        return self.post("/instances", data).json()["ID"]
