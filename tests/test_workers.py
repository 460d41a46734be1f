"""langmamba.workers: the pool of CPU worker processes, and DICOM reading and writing spread over it."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np
import pydicom
import pytest

from langmamba import workers
from langmamba.errors import ConfigError, CorruptFileError
from langmamba.io import read_volume, write_volume
from tests import process_leaks

REPO = str(Path(__file__).resolve().parents[1])


def test_split_covers_every_index_once_in_order():
    for count in (0, 1, 5, 17):
        for parts in (1, 3, 8):
            ranges = workers.split(count, parts)
            assert [i for r in ranges for i in r] == list(range(count))
            assert len(ranges) <= max(1, min(parts, count))
            assert all(len(r) > 0 for r in ranges)
            if ranges:
                assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_worker_count_comes_from_the_environment(monkeypatch):
    try:
        monkeypatch.setenv("LANGMAMBA_WORKERS", "3")
        workers.configure(None)
        assert workers.worker_count() == 3
        monkeypatch.setenv("LANGMAMBA_WORKERS", "many")
        workers.configure(None)
        with pytest.raises(ConfigError, match="LANGMAMBA_WORKERS.*'many'"):
            workers.worker_count()
        monkeypatch.setenv("LANGMAMBA_WORKERS", "-1")
        workers.configure(None)
        for _ in range(2):  # and again: a bad value is never kept
            with pytest.raises(ConfigError, match="0 or more"):
                workers.worker_count()
        monkeypatch.delenv("LANGMAMBA_WORKERS")
        workers.configure(None)
        assert workers.worker_count() == min(workers.MAX_DEFAULT_WORKERS, max(0, workers.usable_cores() - 2))
        assert 1 <= workers.usable_cores() <= (os.cpu_count() or 1)
    finally:
        monkeypatch.delenv("LANGMAMBA_WORKERS", raising=False)
        workers.configure(None)
    with pytest.raises(ConfigError, match="0 or more"):
        workers.configure(-2)


def test_in_process_futures_hold_results_and_errors(in_process):
    assert workers.submit(divmod, 7, 2).result() == (3, 1)
    failed = workers.submit(divmod, 1, 0)
    with pytest.raises(ZeroDivisionError):
        failed.result()
    assert workers.map_ordered(pow, [(2, 3), (3, 2)]) == [8, 9]


def test_processes_run_tasks_in_order_and_pass_errors_back(worker_processes):
    assert workers.map_ordered(pow, [(2, k) for k in range(10)]) == [2**k for k in range(10)]
    pids = set(workers.map_ordered(os.getpid, [()] * 8))
    assert os.getpid() not in pids  # the tasks ran in other processes
    with pytest.raises(ZeroDivisionError):
        workers.map_ordered(divmod, [(1, 1), (1, 0)])


def _fill_row(handle, row: int) -> int:
    workers.open_shared(handle)[row] = row + 0.5
    return row


def test_tasks_fill_a_shared_array_that_outlives_its_file(worker_processes):
    with workers.shared_empty((4, 3), np.float32) as (array, handle):
        assert handle is not None and not isinstance(handle, np.ndarray)  # shared memory, not pickles
        assert workers.map_ordered(_fill_row, [(handle, row) for row in range(4)]) == [0, 1, 2, 3]
    np.testing.assert_array_equal(array, np.repeat(np.arange(4, dtype=np.float32)[:, None] + 0.5, 3, axis=1))
    assert not [p for p in os.listdir("/dev/shm") if p.startswith("langmamba-")]  # unlinked from the start


def test_a_failed_task_waits_for_the_others_before_raising(worker_processes):
    futures = [workers.submit(divmod, 1, 0), workers.submit(time.sleep, 0.5), workers.submit(time.sleep, 0.5)]
    with pytest.raises(ZeroDivisionError):
        list(workers.results(futures))
    assert all(future.done() for future in futures)


def _pool_in_a_child() -> None:
    workers.configure(2)
    assert workers.map_ordered(pow, [(3, 2)] * 4) == [9] * 4


def test_a_multiprocessing_child_with_a_pool_exits():
    """multiprocessing children skip atexit: the pool must still stop, or the child waits on it forever."""
    child = multiprocessing.get_context("spawn").Process(target=_pool_in_a_child)
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0


def _written(folder):
    """Per file name: the dataset without its per-write UIDs and times."""
    files = {}
    for path in sorted(folder.iterdir()):
        ds = pydicom.dcmread(path)
        files[path.name] = (
            int(ds.InstanceNumber),
            [float(v) for v in ds.ImagePositionPatient],
            float(ds.SliceLocation),
            ds.PixelData,
        )
    return files


def test_dicom_series_written_and_read_by_processes_equals_in_process(tmp_path, tiny_ct_volume, worker_processes):
    parallel = write_volume(tiny_ct_volume, tmp_path / "parallel", series_description="by workers")
    assert workers._pool is not None
    back_parallel = read_volume(parallel)
    workers.configure(0)
    serial = write_volume(tiny_ct_volume, tmp_path / "serial", series_description="by workers")
    assert _written(parallel) == _written(serial)
    uids = {str(pydicom.dcmread(p).SOPInstanceUID) for p in parallel.iterdir()}
    assert len(uids) == tiny_ct_volume.shape[0]  # every worker made its own unique UIDs
    back_serial = read_volume(serial)
    np.testing.assert_array_equal(back_parallel.hu, back_serial.hu)
    np.testing.assert_array_equal(back_parallel.hu, tiny_ct_volume.hu)
    np.testing.assert_allclose(back_parallel.affine_lps(), tiny_ct_volume.affine_lps(), atol=1e-4)


def test_without_shared_memory_workers_pass_the_voxels(tmp_path, tiny_ct_volume, worker_processes, monkeypatch):
    monkeypatch.setattr(workers, "_SHARED_DIR", str(tmp_path / "no-shm"))
    with workers.shared_empty((2, 2), np.float32) as (_, handle):
        assert handle is None
    folder = write_volume(tiny_ct_volume, tmp_path / "series")
    np.testing.assert_array_equal(read_volume(folder).hu, tiny_ct_volume.hu)


def test_a_damaged_file_read_by_a_worker_is_named(tmp_path, tiny_ct_volume, worker_processes):
    folder = write_volume(tiny_ct_volume, tmp_path / "series")
    victim = sorted(folder.iterdir())[-1]
    victim.write_bytes(victim.read_bytes()[:-1000])  # pixel data cut short
    with pytest.raises(CorruptFileError, match=victim.name):
        read_volume(folder)


def test_sigterm_ends_a_worker_whatever_its_parent_does_with_it(worker_processes):
    """A server's SIGTERM/SIGINT handlers, inherited through fork, would make its workers ignore a stop."""
    previous = {signum: signal.signal(signum, _ignore) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert workers.map_ordered(_handlers, [()] * 4) == [(signal.SIG_DFL, signal.SIG_DFL)] * 4
        victim = next(iter(workers._pool._processes))
        os.kill(victim, signal.SIGTERM)
        assert _wait_ended([victim], timeout=15) == []
        # The pool's manager thread sees the end of a worker a moment later: tasks given to it before then may
        # fail (or run on the surviving workers); once it has, the next task replaces the broken pool.
        deadline = time.monotonic() + 15
        while victim in workers._pool._processes and time.monotonic() < deadline:
            with contextlib.suppress(BrokenProcessPool):
                workers.map_ordered(pow, [(2, 3)] * 4)
            time.sleep(0.05)
        assert victim not in workers._pool._processes
        assert workers.map_ordered(pow, [(2, 3)] * 4) == [8] * 4
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _ignore(signum, frame) -> None:
    pass


def _handlers() -> tuple:
    return signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)


# A process that makes a pool (from its main thread, or from a thread that then ends, as a server's request thread
# does), prints its workers' pids and waits; its SIGTERM handler ignores the signal, as a server's would for a while.
_POOL_OWNER = """
import os, signal, sys, threading, time
from langmamba import workers

signal.signal(signal.SIGTERM, lambda signum, frame: None)
workers.configure(2)
if sys.argv[1] == "main":
    workers.map_ordered(int, [()] * 4)
else:
    thread = threading.Thread(target=workers.map_ordered, args=(int, [()] * 4))
    thread.start()
    thread.join()
if sys.argv[2] == "held":  # another child of this process keeps the workers' pipe open
    if os.fork() == 0:
        time.sleep(60)
        os._exit(0)
print(" ".join(str(p) for p in workers._pool._processes), flush=True)
time.sleep(120)
"""


def _start_pool_owner(how: str, pipe: str = "free") -> tuple[subprocess.Popen, list[int]]:
    owner = subprocess.Popen(
        [sys.executable, "-c", _POOL_OWNER, how, pipe],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    pids = [int(p) for p in owner.stdout.readline().split()]
    assert len(pids) == 2, "the pool owner did not start its workers"
    return owner, pids


def _wait_ended(pids: list[int], timeout: float) -> list[int]:
    """The pids still running after ``timeout`` seconds (a zombie has ended)."""
    deadline = time.monotonic() + timeout
    while (running := [p for p in pids if process_leaks.is_running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


@pytest.mark.parametrize("how, pipe", [("main", "free"), ("thread", "free"), ("thread", "held")])
def test_workers_end_when_their_parent_is_killed(how, pipe):
    owner, pids = _start_pool_owner(how, pipe)
    others = []
    try:
        others = [p for p in process_leaks.descendants(owner.pid) if p not in pids]
        time.sleep(1.5)  # the thread that made the pool has ended; its workers must not end with it
        assert all(process_leaks.is_running(p) for p in pids)
        owner.kill()
        owner.wait()
        assert _wait_ended(pids, timeout=15) == []
    finally:
        owner.kill()
        owner.wait()
        for pid in pids + others:
            if process_leaks.is_running(pid):
                os.kill(pid, signal.SIGKILL)
        _wait_ended(pids + others, timeout=5)
