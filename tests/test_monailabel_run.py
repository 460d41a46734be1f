"""``make run``'s entry point: the sample study prepared outside the cache, the banner, a serving server."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import requests
import torch

from langmamba.sample_data import sample_path
from tests.servers import REPO, free_port


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
    process = subprocess.Popen([sys.executable, str(REPO / "monailabel_app" / "serve.py"), "--port", str(port),
                                "--studies", str(studies)], cwd=tmp_path, env=env, stdout=open(log, "wb"),
                               stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                info = requests.get(f"{url}/info/", timeout=5).json()
                break
            except requests.RequestException:
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.5)
        assert "langmamba_denoise" in info["models"]
        assert requests.get(f"{url}/datastore/", timeout=30).json()["total"] == 1
        banner = log.read_text()
        assert f"URL:      {url}" in banner and "3D Slicer" in banner
        assert ("device:   cuda" if torch.cuda.is_available() else "device:   cpu") in banner
    finally:
        process.terminate()
        process.wait(timeout=30)
