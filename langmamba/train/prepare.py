"""Preparing a training set: the slices a data config names, with their candidate words, in one file.

Preparing runs where the data and the vision-language model live (reading DICOM, scoring words); training then
needs nothing but the file (:mod:`langmamba.data.prepared`), numpy and torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.prepared import write_prepared
from .config import TrainConfig
from .data import load_slices


def prepare_dataset(config: TrainConfig, output: str | Path, progress: bool = True) -> Path:
    """Load the slices the data config names, select their candidate words, and write ``output`` (.npz)."""
    from ..vlm import load_language_space, select_words

    slices, _ = load_slices(config.data)
    c = config.langae
    space = load_language_space(c.vlm_backend, c.vlm_model, c.vocabulary)
    words = select_words(
        space,
        [s.full for s in slices],
        c.word_thresholds,
        labels=[s.label if s.label is not None else np.zeros(s.full.shape, bool) for s in slices],
        progress=progress,
    )
    return write_prepared(
        output, slices, words, space.codebook().numpy(), space.vocabulary, space.describe(), c.word_thresholds
    )
