"""2-D CT slices with their patient, the unit every training set is built from."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..io import CTVolume

# Real CT slices shipped by pydicom / pydicom-data (head, pancreas, neck), one patient each.
PYDICOM_CT_SLICES = ("693_UNCR.dcm", "explicit_VR-UN.dcm", "bad_sequence.dcm")


@dataclass
class CTSlice:
    """One axial slice.

    Attributes:
        full: normal-dose HU, float32 (H, W).
        low: the matching low-dose HU (H, W) for real pairs; ``None`` when low dose is simulated.
        spacing_mm: (row, column) pixel size in mm.
        patient: patient identifier used for splits (a code, never a name).
        label: optional lesion mask (H, W).
        words: optional candidate word ids per pyramid level (coarse -> fine), from word selection.
        case: the case of :mod:`langmamba.data.cases` the slice comes from, when it does.
        role: its fixed split role (``training``, ``validation``, ``test``), when known.
        offset: ``(row, column)`` of the slice's top-left pixel in the uncropped slice (body crops).
        index: the slice's index in its source volume.
    """

    full: np.ndarray
    spacing_mm: tuple[float, float]
    patient: str
    low: np.ndarray | None = None
    label: np.ndarray | None = None
    words: list[np.ndarray] | None = None
    case: str | None = None
    role: str | None = None
    offset: tuple[int, int] = (0, 0)
    index: int | None = None


def slices_from_volume(
    volume: CTVolume, patient: str, label: np.ndarray | None = None, low: CTVolume | None = None
) -> list[CTSlice]:
    """Split a volume (and its optional low-dose partner and label, same grid) into slices."""
    spacing = (volume.spacing[1], volume.spacing[0])
    if low is not None and low.shape != volume.shape:
        raise ConfigError(f"low-dose volume of {patient} has shape {low.shape}, normal dose {volume.shape}")
    return [
        CTSlice(
            full=volume.hu[z],
            spacing_mm=spacing,
            patient=patient,
            low=None if low is None else low.hu[z],
            label=None if label is None else np.asarray(label[z]) > 0,
        )
        for z in range(volume.shape[0])
    ]


def builtin_training_slices(include_pydicom: bool = True) -> list[CTSlice]:
    """The shipped training set: the lung1 sample scan and the real CT slices of pydicom-data.

    The held-out volume (lung2) is never part of it.
    """
    from ..io import read_volume
    from ..sample_data import TRAINING_CASES, sample_path

    slices: list[CTSlice] = []
    for case in TRAINING_CASES:
        volume = read_volume(sample_path(case, "image"))
        label = read_volume(sample_path(case, "label"), check_hu=False).hu
        slices += slices_from_volume(volume, patient=case, label=label)
    if include_pydicom:
        from pydicom.data import get_testdata_file

        for name in PYDICOM_CT_SLICES:
            volume = read_volume(get_testdata_file(name))
            slices += slices_from_volume(volume, patient=f"pydicom:{name.removesuffix('.dcm')}")
    return slices


def split_by_patient(
    slices: list[CTSlice], validation_patients: list[str] | None = None, validation_fraction: float = 0.2, seed: int = 0
) -> tuple[list[CTSlice], list[CTSlice]]:
    """Patient-level split: no patient has slices on both sides.

    Either name the validation patients, or draw ``validation_fraction`` of the patients at random (at least
    one, and at least one left for training).
    """
    patients = sorted({s.patient for s in slices})
    if validation_patients is None:
        if len(patients) < 2:
            raise ConfigError("a patient-level split needs at least two patients")
        count = min(len(patients) - 1, max(1, round(validation_fraction * len(patients))))
        validation_patients = random.Random(seed).sample(patients, count)
    unknown = set(validation_patients) - set(patients)
    if unknown:
        raise ConfigError(f"validation patients not in the data: {sorted(unknown)}; known: {patients}")
    chosen = set(validation_patients)
    return [s for s in slices if s.patient not in chosen], [s for s in slices if s.patient in chosen]
