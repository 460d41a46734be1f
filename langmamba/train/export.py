"""Turn a training checkpoint into a shipped one: optionally half precision and inference-only."""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..errors import CheckpointError


def export_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    half: bool = False,
    inference_only: bool = False,
    max_shard_mb: float | None = None,
) -> Path:
    """Load ``source`` and save it to ``destination`` (fp16 weights with ``half``; a LangMamba without its
    LangAE image decoder with ``inference_only``; weight files of at most ``max_shard_mb`` MiB), keeping the
    training record under ``extra``."""
    model = load_checkpoint(source)
    extra = dict(model.checkpoint_config.get("extra", {}))
    if inference_only:
        if not hasattr(model, "without_langae_decoder"):
            raise CheckpointError(f"{source} holds a {type(model).__name__}; only LangMamba has an inference-only form")
        model = model.without_langae_decoder()
    if half:
        model = model.to(torch.float16)
        extra["stored_dtype"] = "float16"
    return save_checkpoint(model, destination, extra=extra, max_shard_mb=max_shard_mb)
