"""Processes a test session leaves behind: found at its end, killed, and reported as a failure.

The pytest process becomes a child subreaper (Linux), so a process whose parent dies (a test server's worker, a
daemon that forked twice) is adopted by pytest instead of ``init`` and is still found among pytest's descendants
at the end of the session. Hooked into the session by ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import time
from pathlib import Path

import pytest

_PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h
_GRACE_S = 5.0  # for processes a test stopped but did not wait for
# multiprocessing's helpers of the pytest process itself: they exit with it.
_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")
_PROC = Path("/proc")


def adopt_orphans() -> None:
    """Make this process the subreaper of its descendants (no-op outside Linux)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(
            _PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(1), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        )


def _stat(pid: int) -> tuple[str, int] | None:
    """``(state, parent pid)`` of ``pid`` from ``/proc``, ``None`` once it is gone."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name in parentheses may hold spaces
    return fields[0], int(fields[1])


def command_line(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def reap(pid: int) -> None:
    """Collect the exit status of ``pid`` if it is a finished child of this process."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int) -> bool:
    """Whether ``pid`` exists and has not finished (a zombie has finished). Never reaps it: its parent (such as
    multiprocessing, which polls its children) must see it end."""
    found = _stat(pid)
    return found is not None and found[0] != "Z"


def descendants(root: int) -> list[int]:
    """Running processes below ``root`` (children, grandchildren ...)."""
    parents: dict[int, list[int]] = {}
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            found = _stat(int(entry.name))
            if found is not None:
                parents.setdefault(found[1], []).append(int(entry.name))
    found_below, queue = [], list(parents.get(root, []))
    while queue:
        pid = queue.pop()
        queue.extend(parents.get(pid, []))
        if is_running(pid):
            found_below.append(pid)
    return sorted(found_below)


def _is_own_helper(pid: int, root: int) -> bool:
    found = _stat(pid)
    return found is not None and found[1] == root and any(helper in command_line(pid) for helper in _HELPERS)


def leftovers(root: int) -> list[int]:
    """Running descendants of ``root`` other than multiprocessing's helpers of ``root`` itself."""
    return [pid for pid in descendants(root) if not _is_own_helper(pid, root)]


def kill_leftovers(root: int, grace: float = _GRACE_S) -> dict[int, str]:
    """Wait up to ``grace`` seconds for the descendants of ``root`` to end, then kill those left (SIGKILL) and
    return their command lines by pid."""
    deadline = time.monotonic() + grace
    while (left := leftovers(root)) and time.monotonic() < deadline:
        _reap_children(root)
        time.sleep(0.1)
    named = {pid: command_line(pid) for pid in left}
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while any(is_running(pid) for pid in left) and time.monotonic() < deadline:
        time.sleep(0.05)
    _reap_children(root)
    return named


def _reap_children(root: int) -> None:
    """Collect the finished children of this process (orphans it adopted as subreaper) at the end of a session."""
    if root == os.getpid():
        for entry in _PROC.iterdir():
            found = _stat(int(entry.name)) if entry.name.isdigit() else None
            if found is not None and found == ("Z", root):
                reap(int(entry.name))


def pytest_sessionstart(session: pytest.Session) -> None:
    adopt_orphans()


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the session when it leaves a process running; the process is killed."""
    from langmamba import workers

    workers.shutdown()  # this process's own pool: stopped at exit anyway, and not a leak
    left = kill_leftovers(os.getpid())
    if not left:
        return
    title = f"the test session left {len(left)} process(es) running; killed now"
    lines = [f"pid {pid}: {command[:200]}" for pid, command in left.items()]
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        print("\n".join([title, *lines]), file=sys.stderr)
    else:
        reporter.line("")
        reporter.write_sep("=", title, red=True)
        for line in lines:
            reporter.write_line(line, red=True)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
