"""langmamba.workers: the pool of CPU worker processes, and DICOM reading and writing spread over it."""

from __future__ import annotations

import multiprocessing
import os
import time

import numpy as np
import pydicom
import pytest

from langmamba import workers
from langmamba.errors import ConfigError, CorruptFileError
from langmamba.io import read_volume, write_volume


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
        files[path.name] = (int(ds.InstanceNumber), [float(v) for v in ds.ImagePositionPatient],
                            float(ds.SliceLocation), ds.PixelData)
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
