"""Real low-/normal-dose pairs: the LangMamba code's ``.npy`` layout and AAPM-Mayo DICOM/IMA folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError, InputError
from .slices import CTSlice, slices_from_volume


def _patient_of(name: str) -> str:
    """AAPM-Mayo file names start with the patient code, e.g. ``L067_0_input.npy`` -> ``L067``."""
    return name.split("_", 1)[0]


def load_npy_pairs(
    root: str | Path,
    split: str = "train",
    low_dir: str = "quarter_1mm",
    full_dir: str = "full_1mm",
    hu_offset: float = 0.0,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
) -> list[CTSlice]:
    """Pairs stored as ``<root>/<split>/{quarter_1mm,full_1mm}/*.npy`` (one 2-D slice per file).

    Files are paired by identical name. ``hu_offset`` is subtracted from the stored values (some preprocessing
    scripts store HU + 1024). The patient of a slice is the file-name prefix before the first ``_``.
    """
    low_folder, full_folder = Path(root) / split / low_dir, Path(root) / split / full_dir
    for folder in (low_folder, full_folder):
        if not folder.is_dir():
            raise ConfigError(f"missing folder {folder} (expected <root>/{split}/{{{low_dir},{full_dir}}}/*.npy)")
    low_files = {p.name: p for p in sorted(low_folder.glob("*.npy"))}
    full_files = {p.name: p for p in sorted(full_folder.glob("*.npy"))}
    if not low_files or low_files.keys() != full_files.keys():
        only = sorted(set(low_files) ^ set(full_files))[:5]
        raise InputError(
            f"{low_folder} and {full_folder} must hold .npy files of the same names; unmatched: {only or 'none found'}"
        )
    slices = []
    for name in low_files:
        low = np.load(low_files[name]).astype(np.float32) - hu_offset
        full = np.load(full_files[name]).astype(np.float32) - hu_offset
        if low.ndim != 2 or low.shape != full.shape:
            raise InputError(f"{name}: expected two 2-D slices of equal shape, got {low.shape} and {full.shape}")
        slices.append(CTSlice(full=full, low=low, spacing_mm=spacing_mm, patient=_patient_of(name)))
    return slices


def load_mayo_dicom_pairs(
    root: str | Path, low_pattern: str = "quarter*", full_pattern: str = "full*"
) -> list[CTSlice]:
    """AAPM-Mayo folders ``<root>/<patient>/{quarter_*,full_*}/`` of DICOM/IMA slices, paired by position."""
    from ..io import read_volume

    slices = []
    patients = sorted(p for p in Path(root).iterdir() if p.is_dir())
    for patient in patients:
        lows, fulls = sorted(patient.glob(low_pattern)), sorted(patient.glob(full_pattern))
        if len(lows) != 1 or len(fulls) != 1:
            raise InputError(
                f"{patient}: expected one {low_pattern} and one {full_pattern} folder, "
                f"found {len(lows)} and {len(fulls)}"
            )
        full, low = read_volume(fulls[0]), read_volume(lows[0])
        slices += slices_from_volume(full, patient=patient.name, low=low)
    if not slices:
        raise InputError(f"no patient folders with {low_pattern}/{full_pattern} series under {root}")
    return slices
