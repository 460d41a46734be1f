"""The test lanes: a test that starts a server must carry the ``server`` marker (``make test-quick`` leaves those
out), and the lanes' markers are registered."""

from __future__ import annotations

import sys

import pytest

from tests.servers import free_port, start_process, stop_process


def test_an_unmarked_test_cannot_start_a_server(tmp_path):
    marker = tmp_path / "started"
    command = [sys.executable, "-c", f"open({str(marker)!r}, 'w').close()"]
    with pytest.raises(
        RuntimeError,
        match=r"test_an_unmarked_test_cannot_start_a_server starts Python .* "
        r"not marked @pytest.mark.server",
    ):
        start_process(command, tmp_path / "log", f"http://127.0.0.1:{free_port()}/", "Python", timeout=5)
    assert not marker.exists()  # refused before the process started


@pytest.mark.server
def test_a_marked_test_starts_its_server(tmp_path):
    port = free_port()
    process = start_process(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
        tmp_path / "log",
        f"http://127.0.0.1:{port}/",
        "http.server",
        timeout=30,
        cwd=tmp_path,
    )
    try:
        assert process.poll() is None
    finally:
        stop_process(process)


def test_the_lanes_markers_are_registered(pytestconfig):
    registered = {line.split(":")[0] for line in pytestconfig.getini("markers")}
    assert {"slow", "server", "gpu"} <= registered
