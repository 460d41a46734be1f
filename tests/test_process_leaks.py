"""The session check of tests/conftest.py: a test session that leaves a process running fails, and the process is
killed, whether it is still pytest's child or an orphan whose parent ended."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import process_leaks

REPO = Path(__file__).resolve().parents[1]

_LEAKING_TEST = """
import os, subprocess, sys

SLEEP = [sys.executable, "-c", "import time; time.sleep(300)"]


def test_leaks_a_child_and_an_orphan(tmp_path):
    child = subprocess.Popen(SLEEP)
    read, write = os.pipe()
    if os.fork() == 0:  # forks the orphan, then ends at once: the orphan's parent is gone
        orphan = subprocess.Popen(SLEEP, pass_fds=())
        os.write(write, str(orphan.pid).encode())
        os._exit(0)
    orphan = int(os.read(read, 32))
    with open(os.environ["LEAKED_PIDS"], "w") as out:
        out.write(f"{child.pid} {orphan}")
"""


@pytest.mark.slow
def test_a_session_that_leaves_processes_fails_and_kills_them(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.process_leaks import pytest_sessionfinish, pytest_sessionstart\n")
    (tmp_path / "test_leak.py").write_text(_LEAKING_TEST)
    leaked = tmp_path / "leaked.txt"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "LEAKED_PIDS": str(leaked)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    pids = [int(p) for p in leaked.read_text().split()]
    assert "1 passed" in run.stdout
    assert run.returncode == 1, run.stdout + run.stderr
    assert "left 2 process(es) running" in run.stdout
    assert all(f"pid {pid}:" in run.stdout for pid in pids)
    assert not [pid for pid in pids if process_leaks.is_running(pid)]


def test_a_clean_session_passes(tmp_path):
    (tmp_path / "conftest.py").write_text("from tests.process_leaks import pytest_sessionfinish, pytest_sessionstart\n")
    (tmp_path / "test_clean.py").write_text(
        "import subprocess, sys\n\ndef test_waits():\n    subprocess.run([sys.executable, '-c', 'pass'], check=True)\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "running" not in run.stdout
