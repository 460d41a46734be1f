"""Admission of denoising requests: a bounded queue, a per-client limit, and cancellation on disconnect.

Every request holds a place from its arrival until its response is ready; the model runs one at a time, so the
places are the queue. When ``max_queue`` places are taken, or the client already holds ``max_per_client``, the
request is refused at once with 429 (before its body is read). A client is the user name when authentication is
on, else the peer address (behind a reverse proxy every client shares one address: turn authentication on there).
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from starlette.requests import Request


class TooBusyError(Exception):
    """The queue, or the client's share of it, is full (429)."""


class Admission:
    """Places for at most ``max_queue`` requests in total and ``max_per_client`` per client."""

    def __init__(self, max_queue: int = 16, max_per_client: int = 4) -> None:
        if max_queue < 1 or max_per_client < 1:
            raise ValueError(f"max_queue and max_per_client must be at least 1, got {max_queue}, {max_per_client}")
        self.max_queue = max_queue
        self.max_per_client = max_per_client
        self._held: Counter[str] = Counter()
        self._lock = threading.Lock()

    @contextmanager
    def place(self, client: str) -> Iterator[None]:
        """Hold a place for ``client`` while the block runs; :class:`TooBusyError` when none is free."""
        with self._lock:
            if sum(self._held.values()) >= self.max_queue:
                raise TooBusyError(f"the server's queue is full ({self.max_queue} requests); retry later")
            if self._held[client] >= self.max_per_client:
                raise TooBusyError(
                    f"this client already has {self.max_per_client} requests in progress; wait for one to finish"
                )
            self._held[client] += 1
        try:
            yield
        finally:
            with self._lock:
                self._held[client] -= 1
                if self._held[client] <= 0:
                    del self._held[client]


async def watch_disconnect(request: Request, cancel: threading.Event) -> None:
    """Set ``cancel`` when the client of ``request`` disconnects (call once its body has been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return
        await asyncio.sleep(0)
