"""``make run``'s entry point: the sample study prepared outside the cache, the banner, a serving server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import requests
import torch

from langmamba.sample_data import sample_path
from tests.servers import REPO, free_port, start_process, stop_process

pytestmark = pytest.mark.server  # every test here starts a real server


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_serve_starts_the_server_on_the_sample_study_and_says_how_to_connect(tmp_path):
    sys.path.insert(0, str(REPO / "monailabel_app"))
    try:
        from serve import prepare_sample_studies
    finally:
        sys.path.remove(str(REPO / "monailabel_app"))
    cached = sample_path("lung2")
    before = (_digest(cached), cached.stat().st_mtime_ns)
    studies = prepare_sample_studies(tmp_path / "studies")
    assert (_digest(cached), cached.stat().st_mtime_ns) == before  # the cache is only read
    assert _digest(studies / "lung2.nrrd") == before[0]

    port = free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "TMPDIR": str(tmp_path), "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions")}
    url = f"http://127.0.0.1:{port}"
    process = start_process(
        [sys.executable, str(REPO / "monailabel_app" / "serve.py"), "--port", str(port), "--studies", str(studies)],
        log,
        f"{url}/info/",
        "serve.py",
        300,
        cwd=tmp_path,
        env=env,
    )
    try:
        info = requests.get(f"{url}/info/", timeout=30).json()
        assert "langmamba_denoise" in info["models"]
        assert requests.get(f"{url}/datastore/", timeout=30).json()["total"] == 1
        banner = log.read_text()
        assert f"URL:      {url}" in banner and "3D Slicer" in banner
        assert ("device:   cuda" if torch.cuda.is_available() else "device:   cpu") in banner
    finally:
        stop_process(process)


def _serve(*args: str, tmp_path, **env) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "MONAI_LABEL_AUTH_ENABLE"}
    return subprocess.run(
        [sys.executable, str(REPO / "monailabel_app" / "serve.py"), *args],
        cwd=tmp_path,
        env={**environment, "TMPDIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_serve_refuses_to_bind_beyond_loopback_without_auth(tmp_path):
    for host in ("0.0.0.0", "::", "192.0.2.10"):
        done = _serve("--host", host, "--port", str(free_port()), "--studies", str(tmp_path), tmp_path=tmp_path)
        assert done.returncode == 2 and "refusing to serve on" in done.stderr, done.stderr
        assert "without authentication" in done.stderr and "--insecure" in done.stderr
    assert not any(tmp_path.iterdir())  # refused before anything started


def test_the_app_refuses_a_plain_start_server_on_all_interfaces(tmp_path):
    """MONAI Label's own default host is 0.0.0.0: without auth the app stops the start."""
    studies = tmp_path / "studies"
    studies.mkdir()
    command = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(REPO / "monailabel_app"),
        "--studies",
        str(studies),
        "--port",
        str(free_port()),
    ]
    env = {k: v for k, v in os.environ.items() if k != "MONAI_LABEL_AUTH_ENABLE"}
    done = subprocess.run(
        command,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**env, "TMPDIR": str(tmp_path), "MONAI_LABEL_SESSION_PATH": str(tmp_path / "s"), "LANGMAMBA_WORKERS": "0"},
    )
    assert done.returncode != 0
    assert "refusing to serve on 0.0.0.0 without authentication" in done.stdout + done.stderr


def test_serve_insecure_starts_with_a_warning(tmp_path):
    port = free_port()
    log = tmp_path / "serve.log"
    env = {
        **os.environ,
        "TMPDIR": str(tmp_path),
        "MONAI_LABEL_SESSION_PATH": str(tmp_path / "sessions"),
        "LANGMAMBA_WORKERS": "0",
    }
    env.pop("MONAI_LABEL_AUTH_ENABLE", None)
    studies = tmp_path / "studies"
    studies.mkdir()
    process = start_process(
        [
            sys.executable,
            str(REPO / "monailabel_app" / "serve.py"),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--studies",
            str(studies),
            "--insecure",
        ],
        log,
        f"http://127.0.0.1:{port}/info/",
        "serve.py",
        300,
        cwd=tmp_path,
        env=env,
    )
    try:
        text = log.read_text()
        assert "WARNING: --insecure" in text and "WITHOUT authentication" in text
        assert "INSECURE: serving on 0.0.0.0" in text  # the app's own warning
    finally:
        stop_process(process)
