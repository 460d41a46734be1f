"""The CLIP language space: a Hugging Face ``CLIPModel`` (the paper's PubMedCLIP by default).

* Codebook: rows of the text model's token-embedding table (``text_model.embeddings.token_embedding``)
  for the vocabulary. A word the tokenizer splits into several BPE tokens gets the *mean* of their
  rows (CLIP has no single row for it); a one-token word gets its row exactly. With
  ``tokenizer_vocabulary=True`` the vocabulary is the tokenizer's own token list minus special
  tokens, as in the paper, and the codebook is those rows unchanged.
* Similarity: cosine between the CLIP image embedding of the slice and the CLIP text embedding of
  the prompt ``"A CT of {word}"``, min-max normalised per image. The slice is windowed to
  [-160, 240] HU, scaled to [0, 1], resized (bilinear, antialiased) to the vision model's square
  input size, replicated to 3 channels and normalised with the processor's mean/std.

Weights come from ``from_pretrained`` with a hub id or a local folder; nothing is bundled. Prompt
embeddings (the slow part for a 49k-token vocabulary) are cached on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from langmamba.errors import ConfigError, UnsupportedImageError
from langmamba.vlm.base import (
    LanguageSpace,
    SpacingLike,
    as_hu_batch,
    check_grid,
    grid_edges,
    minmax_normalise,
)
from langmamba.vlm.cache import content_key, default_cache_dir, load_npz, save_npz_atomic
from langmamba.vlm.hub import load_pretrained, looks_like_path, model_fingerprint
from langmamba.vlm.vocabulary import VocabularyLike, resolve_vocabulary, vocabulary_sha256

logger = logging.getLogger(__name__)

DEFAULT_CLIP_MODEL = "flaviagiammarino/pubmed-clip-vit-base-patch32"
PROMPT_TEMPLATE = "A CT of {word}"
CT_WINDOW_HU = (-160.0, 240.0)
# OpenAI CLIP normalisation, used only when the model folder has no preprocessor_config.json.
_FALLBACK_MEAN = (0.48145466, 0.4578275, 0.40821073)
_FALLBACK_STD = (0.26862954, 0.26130258, 0.27577711)


def _features(output: Any) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output with ``pooler_output`` (5)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class ClipLanguageSpace(LanguageSpace):
    """Language space from a CLIP model.

    Args:
        model: hub id (default PubMedCLIP ``flaviagiammarino/pubmed-clip-vit-base-patch32``) or a
            local folder written by ``save_pretrained`` (model, tokenizer, optionally processor).
        vocabulary: ``None`` (packaged CT lexicon), a vocabulary file, or a list of words.
        tokenizer_vocabulary: use every non-special tokenizer token as the vocabulary instead.
        device: torch device of the CLIP model.
        cache_dir: embedding cache (default ``$LANGMAMBA_CACHE`` or ``~/.cache/langmamba``).
        use_cache: read and write the embedding cache.
        prompt: text template with ``{word}``.
        batch_size: prompts or images per forward pass.
        progress: show a progress bar while embedding prompts.
    """

    backend = "clip"

    def __init__(
        self,
        model: str = DEFAULT_CLIP_MODEL,
        vocabulary: VocabularyLike = None,
        *,
        tokenizer_vocabulary: bool = False,
        device: str = "cpu",
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        prompt: str = PROMPT_TEMPLATE,
        batch_size: int = 32,
        progress: bool = False,
    ) -> None:
        from transformers import AutoTokenizer, CLIPModel

        if "{word}" not in prompt:
            raise ConfigError(f"prompt must contain '{{word}}', got {prompt!r}")
        if tokenizer_vocabulary and vocabulary is not None:
            raise ConfigError("give either a vocabulary or tokenizer_vocabulary=True, not both")
        self.model_id = str(Path(model).expanduser()) if looks_like_path(str(model)) else str(model)
        self.device = torch.device(device)
        self.prompt = prompt
        self.batch_size = int(batch_size)
        self.progress = progress
        self.tokenizer_vocabulary = bool(tokenizer_vocabulary)
        self.model = load_pretrained(CLIPModel.from_pretrained, self.model_id, "CLIP model")
        self.model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = load_pretrained(AutoTokenizer.from_pretrained, self.model_id, "CLIP tokenizer")
        self.image_size = int(self.model.config.vision_config.image_size)
        self.image_mean, self.image_std = self._normalisation()

        table = self.model.text_model.embeddings.token_embedding.weight
        if self.tokenizer_vocabulary:
            words, token_ids = self._tokenizer_words(table.shape[0])
        else:
            words = resolve_vocabulary(vocabulary)
            token_ids = [self.tokenizer(w, add_special_tokens=False)["input_ids"] for w in words]
            for word, ids in zip(words, token_ids, strict=True):
                if not ids:
                    raise ConfigError(f"vocabulary word {word!r} gives no tokens with the CLIP tokenizer")
        super().__init__(words)
        self.token_ids = token_ids

        commit = getattr(self.model.config, "_commit_hash", None)
        if looks_like_path(self.model_id) or not commit:
            self._fingerprint = model_fingerprint(self.model_id)
        else:
            self._fingerprint = f"hub:{self.model_id}@{commit}"
        self._vocab_hash = vocabulary_sha256(words)
        self._use_cache = use_cache
        key = content_key(
            {
                "kind": "clip-embeddings",
                "format": 1,
                "model": self._fingerprint,
                "vocabulary": self._vocab_hash,
                "tokenizer_vocabulary": self.tokenizer_vocabulary,
                "prompt": prompt,
            }
        )
        self._cache_file = Path(cache_dir or default_cache_dir()) / "embeddings" / f"clip-{key[:32]}.npz"
        cached = (load_npz(self._cache_file) if use_cache else None) or {}
        codebook = cached.get("codebook")
        if codebook is None or codebook.shape != (len(words), table.shape[1]):
            codebook = self._token_rows(table)
        self._codebook = torch.from_numpy(np.ascontiguousarray(codebook, dtype=np.float32))
        text = cached.get("text_features")
        self._text_features = None if text is None or text.shape[0] != len(words) else torch.from_numpy(text)
        if use_cache and "codebook" not in cached:
            self._save_cache()

    def _normalisation(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Mean and std of the model's image processor (OpenAI CLIP values when it has none)."""
        from transformers.image_processing_base import ImageProcessingMixin

        try:
            config, _ = ImageProcessingMixin.get_image_processor_dict(self.model_id)
            return tuple(config["image_mean"]), tuple(config["image_std"])
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("no image processor settings for %s (%s); using OpenAI CLIP mean/std", self.model_id, exc)
            return _FALLBACK_MEAN, _FALLBACK_STD

    def _tokenizer_words(self, rows: int) -> tuple[list[str], list[list[int]]]:
        """Every non-special token with an embedding row, by id -> (token strings, [[id], ...])."""
        special = set(self.tokenizer.all_special_ids)
        by_id = {i: tok for tok, i in self.tokenizer.get_vocab().items() if i not in special and i < rows}
        ids = sorted(by_id)
        return [by_id[i] for i in ids], [[i] for i in ids]

    @torch.no_grad()
    def _token_rows(self, table: torch.Tensor) -> np.ndarray:
        """Mean token-embedding row of each word -> float32 ``(V, text_hidden)``."""
        table = table.detach().float().cpu()
        return torch.stack([table[ids].mean(dim=0) for ids in self.token_ids]).numpy()

    def _save_cache(self) -> None:
        arrays = {"codebook": self._codebook.numpy()}
        if self._text_features is not None:
            arrays["text_features"] = self._text_features.numpy()
        save_npz_atomic(self._cache_file, **arrays)

    @property
    def name(self) -> str:
        return f"clip:{self.model_id}"

    def codebook(self) -> torch.Tensor:
        """Token-embedding rows (mean over a word's tokens), float32 ``(V, text_hidden)``."""
        return self._codebook.clone()

    def token_table(self) -> torch.Tensor:
        """The text model's BPE token-embedding table ``(N, E)`` (the space of :meth:`codebook`)."""
        return self.model.text_model.embeddings.token_embedding.weight.detach().float().cpu().clone()

    def describe(self) -> dict[str, Any]:
        config = self.model.config
        return {
            "backend": self.backend,
            "name": self.name,
            "model": self.model_id,
            "model_fingerprint": self._fingerprint,
            "embedding_dim": int(self._codebook.shape[1]),
            "projection_dim": int(config.projection_dim),
            "image_size": self.image_size,
            "vocabulary_size": len(self),
            "vocabulary_sha256": self._vocab_hash,
            "tokenizer_vocabulary": self.tokenizer_vocabulary,
            "codebook": "token_embedding_mean",
            "prompt": self.prompt,
            "window_hu": list(CT_WINDOW_HU),
        }

    def prompts(self) -> list[str]:
        """The text prompt of each vocabulary entry (token strings are decoded to plain text first)."""
        if not self.tokenizer_vocabulary:
            return [self.prompt.format(word=w) for w in self._vocabulary]
        # decode() turns byte-level BPE back into text; "</w>" marks a word end in CLIP's BPE.
        decoded = [self.tokenizer.decode(ids).replace("</w>", " ").strip() for ids in self.token_ids]
        texts = [text or token for text, token in zip(decoded, self._vocabulary, strict=True)]
        return [self.prompt.format(word=t) for t in texts]

    @torch.no_grad()
    def text_features(self) -> torch.Tensor:
        """Unit-norm CLIP text embeddings of the prompts, float32 ``(V, projection_dim)`` (cached)."""
        if self._text_features is None:
            prompts = self.prompts()
            max_length = int(self.model.config.text_config.max_position_embeddings)
            chunks = []
            starts = range(0, len(prompts), self.batch_size)
            for start in tqdm(starts, desc="CLIP prompts", disable=not self.progress):
                batch = self.tokenizer(
                    prompts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                ).to(self.device)
                out = _features(self.model.get_text_features(**batch))
                chunks.append(F.normalize(out.float(), dim=-1).cpu())
            self._text_features = torch.cat(chunks)
            if self._use_cache:
                self._save_cache()
        return self._text_features

    def pixel_values(self, hu_slices: np.ndarray | Sequence[np.ndarray]) -> torch.Tensor:
        """Slices ``(N, H, W)`` in HU -> model input ``(N, 3, S, S)`` (windowed, resized, normalised)."""
        hu = torch.from_numpy(as_hu_batch(hu_slices))
        low, high = CT_WINDOW_HU
        x = ((hu.clamp(low, high) - low) / (high - low)).unsqueeze(1)
        x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.image_mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, dtype=x.dtype).view(1, 3, 1, 1)
        return (x.expand(-1, 3, -1, -1) - mean) / std

    @torch.no_grad()
    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        chunks = []
        for start in range(0, pixels.shape[0], self.batch_size):
            batch = pixels[start : start + self.batch_size].to(self.device)
            chunks.append(F.normalize(_features(self.model.get_image_features(pixel_values=batch)).float(), dim=-1))
        return torch.cat(chunks).cpu()

    def similarity_batch(
        self,
        hu_slices: np.ndarray | Sequence[np.ndarray],
        *,
        labels: np.ndarray | Sequence[np.ndarray] | None = None,
        spacing_mm: SpacingLike = None,
    ) -> np.ndarray:
        """Cosine(image, prompt) of slices ``(N, H, W)`` in HU -> float32 ``(N, V)``, min-max per row.

        ``labels`` and ``spacing_mm`` are accepted for interface compatibility and not used.
        """
        cosine = self._image_features(self.pixel_values(hu_slices)) @ self.text_features().T
        return minmax_normalise(cosine.numpy())

    def region_similarity(
        self,
        hu_slice: np.ndarray,
        grid: tuple[int, int] = (4, 4),
        *,
        label: np.ndarray | None = None,
        spacing_mm: SpacingLike = None,
    ) -> np.ndarray:
        """Each cell of a ``grid`` over one slice ``(H, W)`` scored as its own image -> ``(g_h, g_w, V)``."""
        if np.ndim(hu_slice) != 2:
            raise UnsupportedImageError(f"region_similarity() takes one slice (H, W), got shape {np.shape(hu_slice)}")
        hu = as_hu_batch(hu_slice, "hu_slice")[0]
        g_h, g_w = check_grid(grid, hu.shape)
        rows, cols = grid_edges(hu.shape[0], g_h), grid_edges(hu.shape[1], g_w)
        cells = [
            self.pixel_values(hu[rows[r] : rows[r + 1], cols[c] : cols[c + 1]]) for r in range(g_h) for c in range(g_w)
        ]
        cosine = self._image_features(torch.cat(cells)) @ self.text_features().T
        return minmax_normalise(cosine.numpy()).reshape(g_h, g_w, len(self))
