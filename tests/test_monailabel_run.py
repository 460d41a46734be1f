"""``make run``'s entry point: the sample study prepared outside the cache, the banner, a serving server."""

from __future__ import annotations

import hashlib
import os
import sys

import requests
import torch

from langmamba.sample_data import sample_path
from tests.servers import REPO, free_port, start_process, stop_process


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
    process = start_process([sys.executable, str(REPO / "monailabel_app" / "serve.py"), "--port", str(port),
                             "--studies", str(studies)], log, f"{url}/info/", "serve.py", 300, cwd=tmp_path, env=env)
    try:
        info = requests.get(f"{url}/info/", timeout=30).json()
        assert "langmamba_denoise" in info["models"]
        assert requests.get(f"{url}/datastore/", timeout=30).json()["total"] == 1
        banner = log.read_text()
        assert f"URL:      {url}" in banner and "3D Slicer" in banner
        assert ("device:   cuda" if torch.cuda.is_available() else "device:   cpu") in banner
    finally:
        stop_process(process)
