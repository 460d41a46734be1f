"""The word list a language space embeds.

The default is the curated CT / radiology lexicon shipped in ``langmamba/resources/vocabulary.txt``
(anatomy, tissues and materials, findings, image-quality terms). A vocabulary file has one entry per
line; blank lines and lines starting with ``#`` are ignored; entries are lower-cased, inner
whitespace is collapsed, and duplicates are an error (the row order is the codebook order, so a
duplicate would silently waste a codebook row).

A line may name the word's tissue class after a bar, ``word | class`` (the region vocabulary
``langmamba/resources/region_vocabulary.txt`` does): :func:`load_vocabulary` drops the class,
:func:`load_word_classes` returns it. The classes are :data:`WORD_CLASSES`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

from langmamba.errors import ConfigError

DEFAULT_VOCABULARY_PATH = Path(__file__).resolve().parent.parent / "resources" / "vocabulary.txt"
REGION_VOCABULARY_PATH = Path(__file__).resolve().parent.parent / "resources" / "region_vocabulary.txt"

WORD_CLASSES = ("air", "lung", "fat", "fluid", "soft tissue", "enhanced vessel", "bone", "metal", "lesion", "structure")
"""Tissue classes a vocabulary word may carry; the first eight are HU classes of a region
(:data:`langmamba.vlm.regions.REGION_CLASSES`), ``lesion`` is supervised by lesion masks, ``structure`` never."""

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


def _read_entries(path: Path) -> list[tuple[str, str | None]]:
    """``(word, class or None)`` of every entry of a vocabulary file, file order."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"vocabulary file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read vocabulary file {path}: {exc}") from exc
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        entry = normalise_entry(line)
        if not entry or entry.startswith("#"):
            continue
        word, bar, word_class = (part.strip() for part in entry.partition("|"))
        if bar and word_class not in WORD_CLASSES:
            raise ConfigError(
                f"vocabulary file {path}, line {number}: unknown class {word_class!r}; known: {', '.join(WORD_CLASSES)}"
            )
        if not word:
            raise ConfigError(f"vocabulary file {path}, line {number}: no word before the class")
        entries.append((word, word_class if bar else None))
    return entries


def load_vocabulary(path: str | Path | None = None) -> list[str]:
    """Read a vocabulary file (default: the packaged lexicon) -> list of normalised words, file order."""
    path = DEFAULT_VOCABULARY_PATH if path is None else Path(path).expanduser()
    return _check_unique([word for word, _ in _read_entries(path)], f"file {path}")


def load_word_classes(path: str | Path | None = None) -> dict[str, str]:
    """``{word: class}`` of a vocabulary file whose every entry names a class (default: the region vocabulary)."""
    path = REGION_VOCABULARY_PATH if path is None else Path(path).expanduser()
    entries = _read_entries(path)
    _check_unique([word for word, _ in entries], f"file {path}")
    missing = [word for word, word_class in entries if word_class is None]
    if missing:
        raise ConfigError(
            f"vocabulary file {path} names no class for {len(missing)} words, e.g. {missing[0]!r}; "
            "write them as 'word | class'"
        )
    return dict(entries)


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
