"""Loading Hugging Face models by hub id or local folder, with errors that say how to fix them.

Nothing here downloads on its own: ``from_pretrained`` uses the local Hugging Face cache, and the
network only when offline mode (``HF_HUB_OFFLINE=1``) is off.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langmamba.vlm.base import LanguageModelUnavailableError

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")


def looks_like_path(model: str) -> bool:
    """True for local folders (existing, or written like a path) rather than ``org/name`` hub ids."""
    return (
        os.path.isdir(model)
        or model.startswith((".", "~", os.sep))
        or (os.altsep is not None and os.altsep in model)
        or model.count("/") > 1
    )


def model_fingerprint(model: str) -> str:
    """Identity of a model's weights for cache keys.

    A local folder -> its resolved path plus name, size and mtime of its weight/config files, so
    replacing the weights invalidates caches. A hub id -> the id plus the cached snapshot commit
    when one is in the local Hugging Face cache.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        digest = hashlib.sha256(str(path.resolve()).encode())
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES):
            stat = file.stat()
            digest.update(f"{file.relative_to(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
        return f"dir:{digest.hexdigest()[:16]}"
    commit = ""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, "config.json")
        if isinstance(cached, str):
            commit = Path(cached).parent.name
    except (ImportError, ValueError, OSError):
        commit = ""
    return f"hub:{model}@{commit or 'unknown'}"


def hub_offline() -> bool:
    """Whether Hugging Face offline mode is on for this process."""
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")


def load_pretrained(loader: Callable[..., Any], model: str, what: str, **kwargs: Any) -> Any:
    """Call ``loader(model, **kwargs)`` (a ``from_pretrained``) and turn failures into a clear error.

    Raises:
        LanguageModelUnavailableError: the folder does not exist or is incomplete, or the hub id is
            neither in the local cache nor reachable; the message says how to provide a local copy.
    """
    if looks_like_path(model):
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise LanguageModelUnavailableError(f"{what} folder not found: {folder}")
        try:
            return loader(str(folder), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise LanguageModelUnavailableError(
                f"folder {folder} does not hold a usable {what} (save one with save_pretrained): {exc}"
            ) from exc
    try:
        return loader(model, **kwargs)
    except (OSError, ValueError) as exc:
        mode = "on (HF_HUB_OFFLINE=1)" if hub_offline() else "off"
        raise LanguageModelUnavailableError(
            f"could not load the {what} '{model}' from the Hugging Face hub or its local cache "
            f"(offline mode {mode}): {str(exc).splitlines()[0]} "
            f"To use it without network access, on a machine with internet run "
            f"`huggingface-cli download {model} --local-dir DIR`, copy DIR here and pass it as the "
            f"model (a local folder works like a hub id); or copy a Hugging Face cache that holds it "
            f"and point HF_HOME at it with HF_HUB_OFFLINE=1."
        ) from exc
