"""A prepared training set: slices, lesion masks and candidate words in one ``.npz`` file.

Preparing runs where the data and the vision-language model live (reading DICOM, scoring words); training then
needs nothing but this file, numpy and torch, which is what a GPU machine without the imaging stack has.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..data import CTSlice
from ..errors import InputError
from .config import TrainConfig

FORMAT = 1


def prepare_dataset(config: TrainConfig, output: str | Path, progress: bool = True) -> Path:
    """Load the slices the data config names, select their candidate words, and write ``output`` (.npz)."""
    from ..vlm import load_language_space, select_words
    from .data import load_slices

    slices, _ = load_slices(config.data)
    c = config.langae
    space = load_language_space(c.vlm_backend, c.vlm_model, c.vocabulary)
    words = select_words(space, [s.full for s in slices], c.word_thresholds,
                         labels=[s.label if s.label is not None else np.zeros(s.full.shape, bool) for s in slices],
                         progress=progress)
    arrays: dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "spacing_mm": np.array([s.spacing_mm for s in slices], np.float64),
        "patients": np.array([s.patient for s in slices]),
        "codebook": space.codebook().numpy(),
        "vocabulary": np.array(space.vocabulary),
        "language_space": np.array(json.dumps(space.describe())),
        "thresholds": np.array(c.word_thresholds, np.float64),
    }
    for i, (s, per_level) in enumerate(zip(slices, words)):
        arrays[f"full_{i}"] = _compact(s.full)
        if s.low is not None:
            arrays[f"low_{i}"] = _compact(s.low)
        if s.label is not None:
            arrays[f"label_{i}"] = s.label.astype(bool)
        for level, ids in enumerate(per_level):
            arrays[f"words{level}_{i}"] = np.asarray(ids, np.int64)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, output)
    return output


def _compact(hu: np.ndarray) -> np.ndarray:
    """int16 when that is lossless (clinical CT stores integer HU), float32 otherwise."""
    if np.all(hu == np.rint(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        return hu.astype(np.int16)
    return hu.astype(np.float32)


def load_prepared(path: str | Path) -> tuple[list[CTSlice], dict]:
    """The slices of a prepared file and its language space: ``codebook`` (V, E), ``vocabulary``, ``describe``."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"{path} is not a prepared training set (.npz written by `langmamba prepare-data`): "
                         f"{error}") from None
    with archive:
        if "format" not in archive or int(archive["format"]) != FORMAT:
            raise InputError(f"{path} is not a prepared training set of format {FORMAT}")
        slices = []
        for i, (spacing, patient) in enumerate(zip(archive["spacing_mm"], archive["patients"])):
            get = lambda name: archive[f"{name}_{i}"] if f"{name}_{i}" in archive else None  # noqa: E731
            low = get("low")
            slices.append(CTSlice(full=archive[f"full_{i}"].astype(np.float32), spacing_mm=tuple(spacing),
                                  patient=str(patient), low=None if low is None else low.astype(np.float32),
                                  label=get("label"),
                                  words=[archive[f"words{level}_{i}"] for level in range(3)]))
        language = {"codebook": archive["codebook"], "vocabulary": [str(v) for v in archive["vocabulary"]],
                    "describe": json.loads(str(archive["language_space"]))}
    return slices, language
