"""Real servers for tests: MONAI Label with the LangMamba app, and Orthanc with its DICOMweb plugin.

Both run as child processes on loopback ports; their logs go to files in the test's temporary folder and are
printed when a server fails to start. Only a test marked ``@pytest.mark.server`` may start one (``make test-quick``
leaves those out); ``tests/conftest.py`` tells this module which test is running.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from langmamba.io.volume import CTVolume

REPO = Path(__file__).resolve().parents[1]
APP_DIR = REPO / "monailabel_app"
ORTHANC_PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))

running_test: pytest.Item | None = None
"""The test being set up or run (set by ``tests/conftest.py``); ``None`` outside pytest."""


def require_server_marker(what: str) -> None:
    """Raise if the running test starts ``what`` (a server) without the ``server`` marker."""
    if running_test is not None and running_test.get_closest_marker("server") is None:
        raise RuntimeError(
            f"{running_test.nodeid} starts {what} but is not marked @pytest.mark.server; "
            "mark it so that `make test-quick` leaves it out"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait(url: str, process: subprocess.Popen, log: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with code {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def start_process(command: list[str], log: Path, url: str, what: str, timeout: float, **popen) -> subprocess.Popen:
    """Start ``command`` with its output in ``log`` and wait until ``url`` answers; stop it if it never does."""
    require_server_marker(what)
    with open(log, "wb") as output:  # the child keeps its own descriptor
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, **popen)
    try:
        _wait(url, process, log, timeout, what)
    except Exception:
        stop_process(process)
        raise
    return process


def stop_process(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class MonaiLabelServer:
    """``python -m monailabel.main start_server --app monailabel_app`` on a free loopback port.

    ``tmp`` holds the server's log and its own ``TMPDIR`` (``tmpdir``), so tests can check that nothing is left
    behind; ``env`` adds MONAI Label settings (``MONAI_LABEL_*``); ``conf`` becomes ``--conf key value`` pairs.
    """

    def __init__(
        self,
        studies: str | Path,
        tmp: Path,
        *,
        conf: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 300.0,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmpdir = tmp / "server-tmp"
        self.tmpdir.mkdir(parents=True, exist_ok=True)
        self.log = tmp / "monailabel.log"
        command = [
            sys.executable,
            "-m",
            "monailabel.main",
            "start_server",
            "--app",
            str(APP_DIR),
            "--studies",
            str(studies),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
        ]
        for key, value in (conf or {}).items():
            command += ["--conf", key, str(value)]
        environment = {**os.environ, "TMPDIR": str(self.tmpdir), **(env or {})}
        environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
        environment.setdefault("MONAI_LABEL_DICOMWEB_CACHE_PATH", str(tmp / "dicomweb-cache"))
        environment.setdefault("MONAI_LABEL_SESSION_PATH", str(tmp / "sessions"))
        self.process = start_process(
            command, self.log, f"{self.url}/info/", "MONAI Label", timeout, cwd=tmp, env=environment
        )
        # files made at start-up (MONAI Label's logging config, torch's compile cache), not by requests
        self.startup_files = self.temp_files()

    def infer(
        self,
        *,
        image: str = "",
        output: str = "json",
        params: dict | None = None,
        upload: Path | None = None,
        headers: dict | None = None,
        timeout: float = 600,
    ) -> requests.Response:
        """``POST /infer/langmamba_denoise``; ``upload`` is sent as the form field ``file``."""
        data = {"params": json.dumps(params or {})}
        query = {"output": output, **({"image": image} if image else {})}
        files = None
        if upload is not None:
            files = {"file": (upload.name, open(upload, "rb"), "application/octet-stream")}  # noqa: SIM115  (closed below)
        try:
            return requests.post(
                f"{self.url}/infer/langmamba_denoise",
                params=query,
                data=data,
                files=files,
                headers=headers,
                timeout=timeout,
            )
        finally:
            if files:
                files["file"][1].close()

    def temp_files(self) -> list[Path]:
        return sorted(self.tmpdir.rglob("*"))

    def stop(self) -> None:
        stop_process(self.process)


def orthanc_plugin() -> Path:
    """The Orthanc DICOMweb plugin installed by ``apt-get install orthanc-dicomweb`` (``.ci/run`` does)."""
    for folder in ORTHANC_PLUGIN_DIRS:
        for path in sorted(folder.glob("libOrthancDicomWeb.so*")):
            return path
    raise RuntimeError(
        "the Orthanc DICOMweb plugin is not installed: apt-get install -y orthanc orthanc-dicomweb "
        "(.ci/run installs it)"
    )


class Orthanc:
    """Orthanc with the DICOMweb plugin on free loopback ports; storage in ``tmp``; no authentication."""

    def __init__(self, tmp: Path, timeout: float = 60.0) -> None:
        executable = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else None)
        if executable is None:
            raise RuntimeError(
                "Orthanc is not installed: apt-get install -y orthanc orthanc-dicomweb (.ci/run installs it)"
            )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        folder = tmp / "orthanc"
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "langmamba-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "HttpPort": self.port,
            "DicomPort": free_port(),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "Plugins": [str(orthanc_plugin())],
            "DicomWeb": {
                "Enable": True,
                "Root": "/dicom-web/",
                "EnableWado": True,
                "StudiesMetadata": "Full",
                "SeriesMetadata": "Full",
            },
        }
        path = folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self.log = folder / "orthanc.log"
        self.process = start_process([executable, str(path)], self.log, f"{self.url}/system", "Orthanc", timeout)

    def upload(self, paths: list[Path]) -> list[dict]:
        """Store DICOM files through Orthanc's REST API."""
        return [requests.post(f"{self.url}/instances", data=p.read_bytes(), timeout=30).json() for p in paths]

    def stop(self) -> None:
        stop_process(self.process)


def crop(volume: CTVolume, z: slice, y: slice, x: slice) -> CTVolume:
    """A sub-volume with its geometry (origin moved to the crop's first voxel)."""
    start = np.array([x.start or 0, y.start or 0, z.start or 0], dtype=float)
    origin = np.asarray(volume.origin) + volume.direction @ (start * np.asarray(volume.spacing))
    return CTVolume(
        hu=np.ascontiguousarray(volume.hu[z, y, x]),
        spacing=volume.spacing,
        origin=tuple(float(v) for v in origin),
        direction=volume.direction,
    )
