"""The audit log: one JSON line per denoising request (who, which image id, when, outcome, duration).

Records never hold patient identifiers or names from the request: an upload is recorded as ``"upload"`` (its file
name, which the client chose, is not written), and a datastore image by its id. The records go to the logger
``langmamba.audit`` (the server log) and, with ``--conf audit_log <file>``, are appended to that file.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

logger = logging.getLogger("langmamba.audit")


class AuditLog:
    """Appends records to ``path`` (if given) and logs them."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path).expanduser() if path else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(
        self,
        *,
        user: str,
        client: str,
        image: str | None,
        status: int,
        outcome: str,
        started: float,
        saved: str | None = None,
    ) -> dict:
        """Write one record; ``started`` is the request's ``time.time()`` at arrival, ``status`` the HTTP
        status, ``outcome`` the error kind or ``"ok"``/``"cancelled"``."""
        entry = {
            "time": datetime.fromtimestamp(started, timezone.utc).isoformat(timespec="milliseconds"),
            "user": user,
            "client": client,
            "image": image[:200] if image is not None else "upload",
            "status": status,
            "outcome": outcome,
            "duration_s": round(time.time() - started, 3),
            "saved": saved,
        }
        line = json.dumps(entry, sort_keys=True)
        logger.info("%s", line)
        if self.path is not None:
            with self._lock, open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")
        return entry
