"""The word list a language space embeds.

The default is the curated CT / radiology lexicon shipped in ``langmamba/resources/vocabulary.txt``
(anatomy, tissues and materials, findings, image-quality terms). A vocabulary file has one entry per
line; blank lines and lines starting with ``#`` are ignored; entries are lower-cased, inner
whitespace is collapsed, and duplicates are an error (the row order is the codebook order, so a
duplicate would silently waste a codebook row).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from langmamba.errors import ConfigError

DEFAULT_VOCABULARY_PATH = Path(__file__).resolve().parent.parent / "resources" / "vocabulary.txt"

VocabularyLike = str | Path | Sequence[str] | None


def normalise_entry(entry: str) -> str:
    """Lower case with single spaces: ``"  Pleural   Effusion "`` -> ``"pleural effusion"``."""
    return " ".join(entry.split()).lower()


def _check_unique(words: list[str], where: str) -> list[str]:
    if not words:
        raise ConfigError(f"vocabulary {where} holds no words")
    seen: dict[str, int] = {}
    for index, word in enumerate(words):
        if word in seen:
            raise ConfigError(f"vocabulary {where}: {word!r} appears twice (entries {seen[word] + 1} and {index + 1})")
        seen[word] = index
    return words


def load_vocabulary(path: str | Path | None = None) -> list[str]:
    """Read a vocabulary file (default: the packaged lexicon) -> list of normalised words, file order."""
    path = DEFAULT_VOCABULARY_PATH if path is None else Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"vocabulary file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read vocabulary file {path}: {exc}") from exc
    words = []
    for line in text.splitlines():
        entry = normalise_entry(line)
        if entry and not entry.startswith("#"):
            words.append(entry)
    return _check_unique(words, f"file {path}")


def resolve_vocabulary(vocabulary: VocabularyLike = None) -> list[str]:
    """``None`` (packaged lexicon), a file path, or a list of words -> checked, normalised word list."""
    if vocabulary is None or isinstance(vocabulary, (str, Path)):
        return load_vocabulary(vocabulary)
    words = []
    for item in vocabulary:
        if not isinstance(item, str):
            raise ConfigError(f"vocabulary entries must be strings, got {type(item).__name__}: {item!r}")
        entry = normalise_entry(item)
        if not entry:
            raise ConfigError("vocabulary list contains an empty entry")
        words.append(entry)
    return _check_unique(words, "list")


def vocabulary_sha256(words: Sequence[str]) -> str:
    """Content hash of a word list (order matters: it is the codebook row order)."""
    return hashlib.sha256("\n".join(words).encode("utf-8")).hexdigest()
