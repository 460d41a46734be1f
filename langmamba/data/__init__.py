"""Training data: real CT slices, low-/normal-dose pairs (real or simulated), patches and patient-level splits."""

from .pairs import load_mayo_dicom_pairs, load_npy_pairs
from .patches import PatchSampler, augment
from .slices import CTSlice, builtin_training_slices, slices_from_volume, split_by_patient

__all__ = [
    "CTSlice",
    "PatchSampler",
    "augment",
    "builtin_training_slices",
    "load_mayo_dicom_pairs",
    "load_npy_pairs",
    "slices_from_volume",
    "split_by_patient",
]
