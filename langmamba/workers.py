"""A shared pool of CPU worker processes for the pure-Python parts of a run: DICOM files and explanation text.

pydicom's reading and writing and the formatting of the explanation JSON run in Python, one core at a time
whatever the threads. On a GPU host they took longer than the GPU itself (300 slices of 512² on an H200 host:
1.6 s to read, 1.6 s to write, 1.3 s of explanation text, against 1.9 s of GPU work), so they are spread over
processes here.

The processes are forked, all at once, when the pool starts: the tasks are module-level functions of torch-free
modules (numpy and pydicom work) and never touch torch or CUDA, which is what makes forking a process that drives a
GPU safe (as torch's own data loaders do). Forking, unlike spawning, does not re-run the caller's ``__main__``, so
scripts without a ``__main__`` guard work too. The pool starts on first use and lives as long as the process, so a
server or a folder run pays its start once.

Workers die with the process that made them, whatever kills it: each resets the signal handlers it inherited
(a server's SIGTERM handler would otherwise make it ignore SIGTERM), and exits when that process is gone: at once
by the kernel's parent-death signal where the pool was made by the main thread (the signal follows the thread that
forked), and within a second by a watcher thread otherwise, which sees the end of a pipe that only the parent
holds open, or the parent's pid change.

The number of processes comes from ``LANGMAMBA_WORKERS``; ``0`` keeps all work in the calling process. The default
is one process per usable CPU core beyond two, at most 8: a 2-core machine works in-process, where extra processes
would only compete with torch's own threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import multiprocessing
import multiprocessing.util
import os
import select
import signal
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any

import numpy as np

from langmamba.errors import ConfigError

MAX_DEFAULT_WORKERS = 8
_SHARED_DIR = "/dev/shm"
_PARENT_POLL_S = 1.0
_PR_SET_PDEATHSIG = 1  # linux/prctl.h
_RESET_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_pool: ProcessPoolExecutor | None = None
_pool_pid: int | None = None
_lifeline: int | None = None  # the write end of the pipe the workers watch, open in the pool's parent only
_count: int | None = None


def worker_count() -> int:
    """Processes of the pool: ``LANGMAMBA_WORKERS`` or the default of the module docstring (or :func:`configure`)."""
    global _count
    if _count is None:
        value = os.environ.get("LANGMAMBA_WORKERS")
        if value is None:
            _count = min(MAX_DEFAULT_WORKERS, max(0, usable_cores() - 2))
            return _count
        try:
            count = int(value)
        except ValueError:
            raise ConfigError(f"LANGMAMBA_WORKERS must be a whole number, got {value!r}") from None
        if count < 0:
            raise ConfigError(f"LANGMAMBA_WORKERS must be 0 or more, got {count}")
        _count = count
    return _count


def usable_cores() -> int:
    """CPU cores this process may run on (a container's limit, not the host's count, where the OS says)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def configure(workers: int | None) -> None:
    """Use ``workers`` processes from now on (``None``: ``LANGMAMBA_WORKERS`` again); stops the current pool."""
    global _count
    if workers is not None and workers < 0:
        raise ConfigError(f"workers must be 0 or more, got {workers}")
    shutdown()
    _count = workers


def shutdown() -> None:
    """Stop the pool's processes (a later task starts a new pool)."""
    global _pool, _lifeline
    if _pool_pid == os.getpid():
        if _pool is not None:
            _pool.shutdown(wait=True, cancel_futures=True)
        if _lifeline is not None:
            os.close(_lifeline)
    _pool, _lifeline = None, None


def _set_parent_death_signal(signum: int) -> None:
    """Have the kernel send ``signum`` to this process when the thread that forked it ends (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # no prctl in this libc: the watcher thread still covers it
        ctypes.CDLL(None, use_errno=True).prctl(
            _PR_SET_PDEATHSIG, ctypes.c_ulong(signum), ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0)
        )


def _watch_parent(parent_pid: int, read_end: int) -> None:
    """Exit this process when the pipe whose ``read_end`` it holds reaches its end (every write end closed: the
    parent is gone) or the parent pid changes (another process still holds a write end)."""
    poller = select.poll()
    poller.register(read_end, select.POLLIN | select.POLLHUP)
    while not poller.poll(1000 * _PARENT_POLL_S) and os.getppid() == parent_pid:
        pass
    os._exit(1)


def _start_worker(parent_pid: int, read_end: int, write_end: int, death_signal: bool) -> None:
    """Initializer of every worker process: default SIGTERM/SIGINT, and exit when the parent is gone (see the
    module docstring): ``read_end`` and ``write_end`` of the parent's lifeline pipe, ``death_signal`` when the pool
    was made by the parent's main thread."""
    for signum in _RESET_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _RESET_SIGNALS)
    os.close(write_end)
    if death_signal:
        _set_parent_death_signal(signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the death signal was set
        os._exit(1)
    threading.Thread(
        target=_watch_parent, args=(parent_pid, read_end), name="langmamba-parent-watch", daemon=True
    ).start()


def _executor() -> ProcessPoolExecutor | None:
    global _pool, _pool_pid, _lifeline
    if _pool is not None and _pool_pid != os.getpid():
        return None  # a forked worker: it works in-process and never uses its parent's pool
    if worker_count() == 0:
        return None
    if _pool is None:
        read_end, write_end = os.pipe()
        # A fork pool starts every process at its first task, in this thread.
        pool = ProcessPoolExecutor(
            max_workers=worker_count(),
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_worker,
            initargs=(os.getpid(), read_end, write_end, threading.current_thread() is threading.main_thread()),
        )
        # The workers start with SIGTERM/SIGINT blocked, so that a stop sent before they reset their handlers waits
        # for the reset instead of meeting the handler inherited from here (a worker that ignored it would leave
        # the pool spinning forever on a kill). Python warns about forking beside threads (torch's, tqdm's); the
        # workers never use what those threads hold (CUDA, torch's thread pools).
        try:
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _RESET_SIGNALS)
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings(
                        "ignore", message=".*use of fork\\(\\) may lead to deadlocks", category=DeprecationWarning
                    )
                    started = pool.submit(int)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
                os.close(read_end)
            started.result()
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            os.close(write_end)
            raise
        _pool, _pool_pid, _lifeline = pool, os.getpid(), write_end
        # Before multiprocessing joins a process's children at exit, in the main process and in a
        # multiprocessing child alike (where atexit handlers do not run), else the idle workers are waited for.
        multiprocessing.util.Finalize(None, shutdown, exitpriority=10)
    return _pool


def submit(function: Callable[..., Any], *args: Any) -> Future:
    """Run ``function(*args)`` in a worker; without workers it runs now and the future holds its result or error.

    ``function`` must be a module-level function that never uses torch or CUDA, and its arguments and result
    must pickle.
    """
    pool = _executor()
    if pool is not None:
        try:
            return pool.submit(function, *args)
        except BrokenProcessPool:
            # A worker was killed (OOM killer, an admin): tasks already given to the pool failed with it, this one
            # and later ones run on a new pool.
            shutdown()
            return _executor().submit(function, *args)
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except BaseException as error:  # handed to the caller through the future, as a worker would
        future.set_exception(error)
    return future


def results(futures: Sequence[Future]) -> Iterator[Any]:
    """The results of ``futures`` in order. On the first error the tasks not started are cancelled and the
    running ones waited for before it is raised, so no task still uses what the caller then releases (such as a
    :func:`shared_empty` array)."""
    try:
        for future in futures:
            yield future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)
        raise


def map_ordered(function: Callable[..., Any], tasks: Sequence[tuple]) -> list:
    """``[function(*task) for task in tasks]``, spread over the workers; the first error is raised."""
    return list(results([submit(function, *task) for task in tasks]))


@contextmanager
def shared_empty(shape: tuple[int, ...], dtype: Any) -> Iterator[tuple[np.ndarray, Any]]:
    """An uninitialised array that worker tasks can fill or read in place, and the handle they take it by.

    Large arrays cost time to pass to and from processes (a 300-slice float32 volume is 300 MB of pickles), so with
    workers the array lives in shared memory: a file in ``/dev/shm``, unlinked at once so nothing is left behind
    whatever happens to this process, that tasks open through ``/proc/<pid>/fd`` (see :func:`open_shared`) while
    this context is open. The array stays valid afterwards. Without workers the handle is the array itself; where
    no shared memory can hold it (no ``/dev/shm``, or too little space) the handle is ``None`` and tasks must
    return their data instead.
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if worker_count() == 0:
        array = np.empty(shape, dtype)
        yield array, array
        return
    if (
        not (os.path.isdir(_SHARED_DIR) and os.path.isdir(f"/proc/{os.getpid()}/fd"))
        or nbytes == 0
        or _free_bytes(_SHARED_DIR) < 2 * nbytes
    ):
        yield np.empty(shape, dtype), None
        return
    fd, path = tempfile.mkstemp(prefix="langmamba-", dir=_SHARED_DIR)
    try:
        os.unlink(path)
        os.ftruncate(fd, nbytes)
        array = np.frombuffer(mmap.mmap(fd, nbytes), dtype=dtype).reshape(shape)
        yield array, (f"/proc/{os.getpid()}/fd/{fd}", tuple(shape), np.dtype(dtype).str)
    finally:
        os.close(fd)


@contextmanager
def shared_copy(array: np.ndarray) -> Iterator[Any]:
    """A handle by which tasks read ``array`` (:func:`open_shared`): the array itself without workers, a copy in
    shared memory with them, or ``None`` where no shared memory can hold it (see :func:`shared_empty`)."""
    if worker_count() == 0:
        yield array
        return
    with shared_empty(array.shape, array.dtype) as (copy, handle):
        if handle is not None:
            copy[...] = array
        yield handle


def open_shared(handle: Any, writable: bool = True) -> np.ndarray:
    """In a task: the array of a :func:`shared_empty` handle (in-process, the array itself)."""
    if isinstance(handle, np.ndarray):
        return handle
    path, shape, dtype = handle
    return np.memmap(path, dtype=np.dtype(dtype), mode="r+" if writable else "r", shape=shape)


def _free_bytes(folder: str) -> int:
    stat = os.statvfs(folder)
    return stat.f_bavail * stat.f_frsize


def split(count: int, parts: int | None = None) -> list[range]:
    """``range(count)`` cut into at most ``parts`` contiguous ranges of near-equal size (default: two per worker,
    one without workers), for tasks that each handle several slices or files."""
    parts = max(1, 2 * worker_count() if parts is None else parts)
    parts = min(parts, max(1, count))
    bounds = [round(i * count / parts) for i in range(parts + 1)]
    return [range(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
