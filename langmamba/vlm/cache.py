"""On-disk cache of embeddings and word selections (atomic ``.npz`` files, no pickles).

Location: ``$LANGMAMBA_CACHE`` if set, else ``~/.cache/langmamba``. Entries are keyed by a SHA-256
of everything they depend on, so a changed model, vocabulary or input gives a new key. A cache that
cannot be written (read-only home, full disk) only costs time: the failure is logged and the result
is still returned.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from langmamba.errors import OverwriteError
from langmamba.io.atomic import write_npz

logger = logging.getLogger(__name__)

CACHE_ENV = "LANGMAMBA_CACHE"


def default_cache_dir() -> Path:
    """``$LANGMAMBA_CACHE`` or ``~/.cache/langmamba`` (not created here)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "langmamba"


def content_key(payload: Any) -> str:
    """SHA-256 hex digest of a JSON-serialisable payload (keys sorted, so dict order does not matter)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> bool:
    """Write arrays to ``path`` through :func:`langmamba.io.atomic.write_npz` (readers never see half a file).

    Returns ``False`` (and logs a warning) when the cache cannot be written.
    """
    path = Path(path)
    try:
        write_npz(path, arrays, compressed=False)
        return True
    except (OSError, OverwriteError) as exc:
        logger.warning("could not write cache file %s (%s); continuing without it", path, exc)
        return False


def load_npz(path: str | Path) -> dict[str, np.ndarray] | None:
    """Read a cache file -> dict of arrays, or ``None`` if missing or unreadable (then it is rebuilt)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        logger.warning("ignoring unreadable cache file %s (%s)", path, exc)
        return None
