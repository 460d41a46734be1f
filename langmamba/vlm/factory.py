"""Choosing and building a language space by name."""

from __future__ import annotations

from pathlib import Path

from langmamba.errors import ConfigError
from langmamba.vlm.base import LanguageSpace
from langmamba.vlm.vocabulary import VocabularyLike

BACKENDS = ("offline", "clip")


def load_language_space(
    backend: str = "offline",
    model: str | None = None,
    vocabulary: VocabularyLike = None,
    device: str = "cpu",
    *,
    tokenizer_vocabulary: bool = False,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
) -> LanguageSpace:
    """Build a language space.

    Args:
        backend: ``"offline"`` (packaged MiniLM text encoder + HU tissue scorer, no network) or
            ``"clip"`` (a Hugging Face CLIP model, PubMedCLIP by default).
        model: backend model: ``None`` for the default, else a hub id or a local folder.
        vocabulary: ``None`` (packaged CT lexicon), a vocabulary file path, or a list of words.
        device: torch device for the models.
        tokenizer_vocabulary: clip only: use the whole tokenizer vocabulary (minus special tokens).
        cache_dir: embedding cache folder (default ``$LANGMAMBA_CACHE`` or ``~/.cache/langmamba``).
        use_cache: read and write the embedding cache.

    Raises:
        ConfigError: unknown backend or incompatible options.
        LanguageModelUnavailableError: the model cannot be loaded (message says how to fix it).
    """
    backend = str(backend).lower()
    if backend == "offline":
        if tokenizer_vocabulary:
            raise ConfigError("tokenizer_vocabulary is only available with backend='clip'")
        from langmamba.vlm.offline import OfflineLanguageSpace

        return OfflineLanguageSpace(vocabulary, model=model, device=device, cache_dir=cache_dir, use_cache=use_cache)
    if backend == "clip":
        from langmamba.vlm.clip import DEFAULT_CLIP_MODEL, ClipLanguageSpace

        return ClipLanguageSpace(
            DEFAULT_CLIP_MODEL if model is None else model,
            vocabulary,
            tokenizer_vocabulary=tokenizer_vocabulary,
            device=device,
            cache_dir=cache_dir,
            use_cache=use_cache,
        )
    raise ConfigError(f"backend: unknown language space {backend!r}; choose one of {', '.join(BACKENDS)}")
