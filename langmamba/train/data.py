"""Training data on the training device: slices, (simulated) low-dose partners, patches, validation set."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..data import CTSlice, PatchSampler, builtin_training_slices, load_mayo_dicom_pairs, load_npy_pairs
from ..data import slices_from_volume, split_by_patient
from ..errors import ConfigError
from ..normalization import hu_to_model
from ..simulate import simulate_slice
from .config import DataConfig

logger = logging.getLogger(__name__)


def load_slices(config: DataConfig) -> tuple[list[CTSlice], dict | None]:
    """All slices named by the data config, optionally limited per patient and centre-cropped (for quick runs),
    and the language space stored with a prepared set (``None`` otherwise)."""
    language = None
    if config.source == "prepared":
        from .prepare import load_prepared

        slices, language = load_prepared(config.root)
    elif config.source == "cases":
        from ..data.cases import case_slices

        slices = case_slices(slice_step=config.slice_step, margin_px=config.crop_margin_px,
                             min_size=config.crop_min_px)
    elif config.source == "builtin":
        slices = builtin_training_slices(include_pydicom=config.include_pydicom)
    elif config.source == "npy":
        slices = load_npy_pairs(config.root)
    elif config.source == "mayo":
        slices = load_mayo_dicom_pairs(config.root)
    else:
        from ..io import read_volume

        slices = []
        for index, path in enumerate(config.volumes):
            slices += slices_from_volume(read_volume(path), patient=f"volume{index}")
    if config.max_slices_per_patient:
        kept, counts = [], {}
        for s in slices:
            counts[s.patient] = counts.get(s.patient, 0) + 1
            if counts[s.patient] <= config.max_slices_per_patient:
                kept.append(s)
        slices = kept
    if config.crop:
        slices = [_centre_crop(s, config.crop) for s in slices]
    return slices, language


def _centre_crop(s: CTSlice, size: int) -> CTSlice:
    def crop(image):
        if image is None:
            return None
        top, left = max(0, (image.shape[0] - size) // 2), max(0, (image.shape[1] - size) // 2)
        return image[top:top + size, left:left + size]

    top, left = max(0, (s.full.shape[0] - size) // 2), max(0, (s.full.shape[1] - size) // 2)
    return replace(s, full=crop(s.full), low=crop(s.low), label=crop(s.label),
                   offset=(s.offset[0] + top, s.offset[1] + left))


def split_by_role(slices: list[CTSlice], validation_patients: list[str] | None = None
                  ) -> tuple[list[CTSlice], list[CTSlice]]:
    """The fixed patient-level split of :mod:`langmamba.data.cases` carried by prepared slices: training and
    validation slices by their role (test slices are never used). ``validation_patients`` may narrow validation to
    some of its patients, never move a training patient into it."""
    train = [s for s in slices if s.role == "training"]
    validation = [s for s in slices if s.role == "validation"]
    if validation_patients is not None:
        known = {s.patient for s in validation}
        wrong = sorted(set(validation_patients) - known)
        if wrong:
            raise ConfigError(f"data.validation_patients {wrong} are not validation patients of the fixed split; "
                              f"validation patients: {sorted(known)} (or leave the setting unset)")
        validation = [s for s in validation if s.patient in set(validation_patients)]
    return train, validation


def simulate_low_dose(slices: list[CTSlice], config: DataConfig, seed: int, device: str) -> list[np.ndarray]:
    """Low-dose partner of every slice: the real one when present, else simulated (dose drawn per slice)."""
    rng = np.random.default_rng(seed)
    lows = []
    for index, s in enumerate(slices):
        if s.low is not None:
            lows.append(s.low)
            continue
        dose = config.dose if config.dose_max is None else float(rng.uniform(config.dose, config.dose_max))
        lows.append(simulate_slice(s.full, s.spacing_mm, dose=dose, seed=seed * 100_003 + index, device=device))
    return lows


@dataclass
class TrainingData:
    """Patches for training and whole slices for validation, in the model intensity range, on ``device``."""

    train: list[CTSlice]
    validation: list[CTSlice]
    validation_low: list[np.ndarray]
    sampler: PatchSampler
    language: dict | None
    config: DataConfig
    device: torch.device
    seed: int
    refreshes: int = 0

    @classmethod
    def build(cls, config: DataConfig, device: torch.device, seed: int, rank: int = 0,
              validation_slices: int = 8) -> "TrainingData":
        slices, language = load_slices(config)
        if slices and all(s.role is not None for s in slices):
            train, validation = split_by_role(slices, config.validation_patients)
        else:
            train, validation = split_by_patient(slices, config.validation_patients, config.validation_fraction,
                                                 seed)
        step = max(1, len(validation) // max(1, validation_slices))
        validation = validation[::step][:validation_slices]
        logger.info("training on %d slices of %s; validating on %d slices of %s", len(train),
                    sorted({s.patient for s in train}), len(validation), sorted({s.patient for s in validation}))
        simulation_device = "cuda" if device.type == "cuda" else "cpu"
        # Validation noise is drawn once with a fixed seed so scores are comparable across steps.
        validation_low = simulate_low_dose(validation, config, seed=10_000 + seed, device=simulation_device)
        data = cls(train=train, validation=validation, validation_low=validation_low, sampler=None, language=language,
                   config=config,
                   device=device, seed=seed * 1000 + rank)
        data.refresh_noise()
        return data

    def refresh_noise(self) -> None:
        """Draw a fresh low-dose realisation of every training slice (each rank its own)."""
        simulation_device = "cuda" if self.device.type == "cuda" else "cpu"
        lows = simulate_low_dose(self.train, self.config, seed=self.seed + 7919 * self.refreshes,
                                 device=simulation_device)
        images = [torch.stack([torch.as_tensor(hu_to_model(low)), torch.as_tensor(hu_to_model(s.full))]).float()
                  .to(self.device) for low, s in zip(lows, self.train)]
        self.sampler = PatchSampler(images, [s.full for s in self.train], self.config.patch_size,
                                    seed=self.seed + self.refreshes)
        self.refreshes += 1

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(low, full, slice_indices)``: patches (B, 1, P, P) in model range and the training slice of each."""
        patches, which = self.sampler.sample(batch_size, return_index=True)
        return patches[:, :1], patches[:, 1:], which

    @property
    def simulated(self) -> bool:
        return any(s.low is None for s in self.train)
