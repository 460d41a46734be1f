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

from langmamba.vlm.base import LanguageModelUnavailableError, LanguageSpace, minmax_normalise
from langmamba.vlm.cache import default_cache_dir
from langmamba.vlm.clip import DEFAULT_CLIP_MODEL, PROMPT_TEMPLATE, ClipLanguageSpace
from langmamba.vlm.factory import BACKENDS, load_language_space
from langmamba.vlm.offline import OfflineLanguageSpace
from langmamba.vlm.selection import DEFAULT_THRESHOLDS, candidates_from_scores, select_words
from langmamba.vlm.text_encoder import DEFAULT_TEXT_MODEL, SentenceEncoder
from langmamba.vlm.vocabulary import DEFAULT_VOCABULARY_PATH, load_vocabulary, resolve_vocabulary, vocabulary_sha256

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
