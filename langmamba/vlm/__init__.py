"""The language space LangMamba quantises onto.

A :class:`LanguageSpace` gives a frozen word-embedding table for a vocabulary (the codebook ``(V, E)``
LangAE's vector quantiser uses) and an image<->word similarity used to choose candidate words per
training slice (:func:`select_words`). Backends:

* ``offline`` (:class:`OfflineLanguageSpace`, the default): the packaged all-MiniLM-L6-v2 text
  encoder for the words, and a HU tissue-composition scorer for image<->word similarity. Runs with
  no network; not a learned image-text model (see :mod:`langmamba.vlm.offline`).
* ``clip`` (:class:`ClipLanguageSpace`): a Hugging Face CLIP model, PubMedCLIP by default, as in
  the paper; the weights must be in the local Hugging Face cache, reachable, or in a local folder.

Build one with :func:`load_language_space`.
"""

import importlib

# Names are imported on first use (PEP 562), so that ``langmamba.vlm.regions`` and the token codes load on a
# training or evaluation host that has only numpy and torch.
_WHERE = {
    "LanguageModelUnavailableError": "base",
    "LanguageSpace": "base",
    "minmax_normalise": "base",
    "default_cache_dir": "cache",
    "DEFAULT_CLIP_MODEL": "clip",
    "PROMPT_TEMPLATE": "clip",
    "ClipLanguageSpace": "clip",
    "BACKENDS": "factory",
    "load_language_space": "factory",
    "OfflineLanguageSpace": "offline",
    "DEFAULT_THRESHOLDS": "selection",
    "candidates_from_scores": "selection",
    "select_words": "selection",
    "DEFAULT_TEXT_MODEL": "text_encoder",
    "SentenceEncoder": "text_encoder",
    "DEFAULT_VOCABULARY_PATH": "vocabulary",
    "load_vocabulary": "vocabulary",
    "resolve_vocabulary": "vocabulary",
    "vocabulary_sha256": "vocabulary",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"langmamba.vlm.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'langmamba.vlm' has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_TEXT_MODEL",
    "DEFAULT_THRESHOLDS",
    "DEFAULT_VOCABULARY_PATH",
    "PROMPT_TEMPLATE",
    "ClipLanguageSpace",
    "LanguageModelUnavailableError",
    "LanguageSpace",
    "OfflineLanguageSpace",
    "SentenceEncoder",
    "candidates_from_scores",
    "default_cache_dir",
    "load_language_space",
    "load_vocabulary",
    "minmax_normalise",
    "resolve_vocabulary",
    "select_words",
    "vocabulary_sha256",
]
