"""The region vocabulary as a LangAE needs it: words, their tissue classes and their frozen embeddings.

On a machine with the packaged MiniLM the embeddings come from the offline language space (cached like
every offline codebook). A GPU training host has only numpy and torch, so the MiniLM embeddings of the
packaged region vocabulary also ship in ``langmamba/resources/region_vocabulary_minilm.npz``, used only
when its words equal the vocabulary file's (:func:`write_packaged_embeddings` rebuilds it).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from langmamba.errors import ConfigError
from langmamba.io.atomic import write_npz
from langmamba.vlm.base import LanguageModelUnavailableError
from langmamba.vlm.vocabulary import REGION_VOCABULARY_PATH, load_word_classes, vocabulary_sha256

logger = logging.getLogger(__name__)

PACKAGED_EMBEDDINGS = Path(__file__).resolve().parent.parent / "resources" / "region_vocabulary_minilm.npz"


@dataclass
class RegionLanguage:
    """``words`` (V), ``classes`` (V), ``codebook`` ``(V, E)`` float32, the space's ``describe`` dict, and the
    language space itself where it could be loaded (``None`` with the packaged embeddings)."""

    words: list[str]
    classes: list[str]
    codebook: torch.Tensor
    describe: dict
    space: object | None = None


def _packaged(words: list[str]) -> tuple[torch.Tensor, dict] | None:
    if not PACKAGED_EMBEDDINGS.is_file():
        return None
    with np.load(PACKAGED_EMBEDDINGS, allow_pickle=False) as archive:
        if [str(w) for w in archive["words"]] != words:
            return None
        import json

        return torch.from_numpy(archive["codebook"].astype(np.float32)), json.loads(str(archive["describe"]))


def load_region_language(
    vocabulary: str | Path | None = None, backend: str = "offline", model: str | None = None
) -> RegionLanguage:
    """Words, classes and embeddings of a classed vocabulary file (default: the packaged region vocabulary)."""
    path = REGION_VOCABULARY_PATH if vocabulary is None else Path(vocabulary)
    classes = load_word_classes(path)
    words = list(classes)
    try:
        from langmamba.vlm.factory import load_language_space

        space = load_language_space(backend, model, words)
        return RegionLanguage(words, [classes[w] for w in words], space.codebook(), space.describe(), space)
    except (LanguageModelUnavailableError, ImportError) as error:
        packaged = _packaged(words) if backend == "offline" and model is None else None
        if packaged is None:
            raise ConfigError(
                f"cannot embed the region vocabulary {path} here ({error}); prepare the training set "
                "with it where the language model is installed"
            ) from error
        logger.info("region vocabulary embeddings from %s (%s)", PACKAGED_EMBEDDINGS, error)
        return RegionLanguage(words, [classes[w] for w in words], packaged[0], packaged[1])


def write_packaged_embeddings(path: str | Path = PACKAGED_EMBEDDINGS) -> Path:
    """Embed the packaged region vocabulary with the offline space and write the resource (atomic)."""
    import json

    from langmamba.vlm.offline import OfflineLanguageSpace

    words = list(load_word_classes())
    space = OfflineLanguageSpace(words)
    describe = space.describe()
    assert describe["vocabulary_sha256"] == vocabulary_sha256(words)
    return write_npz(
        path,
        {"words": np.array(words), "codebook": space.codebook().numpy(), "describe": np.array(json.dumps(describe))},
    )
