"""Training data on the training device: slices, fresh simulated low dose for every batch, patches, validation.

Every batch is new: ``batch_size / patches_per_slice`` whole normal-dose slices are drawn, simulated at a dose
drawn uniformly from ``[dose, dose_max]`` (one draw per group of slices that share their pixel spacing) on the
training device, and ``patches_per_slice`` body patches are cut from each and given one of the 8 dihedral
flips/rotations. Where the config asks for it, each slice is first softened and zoomed
(:mod:`.appearance`), so the model also meets other pixel sizes and smoother kernels (a slice enlarged by a zoom
``z > 1`` gives ``z²`` times as many patches, so a batch costs about the same to simulate). The denoisers are blind to
the dose (none of them takes it as an input): the noise level is in the image, so one model serves every dose of
the range.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..data import (
    CTSlice,
    PatchSampler,
    builtin_training_slices,
    load_mayo_dicom_pairs,
    load_npy_pairs,
    slices_from_volume,
    split_by_patient,
)
from ..data.cases import TEST, cases_in
from ..data.patches import augment
from ..errors import ConfigError
from ..normalization import hu_to_model
from ..simulate import simulate_batch, simulate_slice
from .appearance import AIR_HU, draw_soften_mm, draw_zoom, gaussian_blur, zoom_slice
from .config import DataConfig

logger = logging.getLogger(__name__)

TEST_PATIENTS = tuple(c.patient for c in cases_in(TEST))
"""The test role of the fixed split (:mod:`langmamba.data.cases`): never trained, validated or tuned on."""


def load_slices(config: DataConfig) -> tuple[list[CTSlice], dict | None]:
    """All slices named by the data config, optionally limited per patient and centre-cropped (for quick runs),
    and the language space stored with a prepared set (``None`` otherwise)."""
    language = None
    if config.source == "prepared":
        from ..data.prepared import load_prepared

        slices, language = load_prepared(config.root)
    elif config.source == "cases":
        from ..data.cases import case_slices

        slices = case_slices(slice_step=config.slice_step, margin_px=config.crop_margin_px, min_size=config.crop_min_px)
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
    top, left = max(0, (s.full.shape[0] - size) // 2), max(0, (s.full.shape[1] - size) // 2)

    def crop(image):
        return None if image is None else image[top : top + size, left : left + size]

    return dataclasses.replace(
        s, full=crop(s.full), low=crop(s.low), label=crop(s.label), offset=(s.offset[0] + top, s.offset[1] + left)
    )


def split_slices(slices: list[CTSlice], config: DataConfig, seed: int) -> tuple[list[CTSlice], list[CTSlice]]:
    """Training and validation slices: by their fixed split role when every slice carries one (the prepared set
    of the data issue; ``data.validation_patients`` may then narrow validation to some of its patients, never
    move a training patient into it), else by patient. The test patients are never used, and naming one as a
    validation patient is refused."""
    named = set(config.validation_patients or [])
    if named & set(TEST_PATIENTS):
        raise ConfigError(
            f"data.validation_patients names the test case {sorted(named & set(TEST_PATIENTS))}; "
            "it is held out for the final evaluation"
        )
    if slices and all(s.role for s in slices):
        return split_by_role(slices, config.validation_patients)
    slices = [s for s in slices if s.patient not in TEST_PATIENTS]
    return split_by_patient(slices, config.validation_patients, config.validation_fraction, seed)


def split_by_role(
    slices: list[CTSlice], validation_patients: list[str] | None = None
) -> tuple[list[CTSlice], list[CTSlice]]:
    """The fixed patient-level split carried by prepared slices (``role``): training and validation slices by
    their role; test slices and test patients are never used. ``validation_patients`` may narrow validation to
    some of its patients, never move a training patient into it."""
    train = [s for s in slices if s.role in ("training", "train") and s.patient not in TEST_PATIENTS]
    validation = [s for s in slices if s.role == "validation" and s.patient not in TEST_PATIENTS]
    if validation_patients is not None:
        known = {s.patient for s in validation}
        wrong = sorted(set(validation_patients) - known)
        if wrong:
            raise ConfigError(
                f"data.validation_patients {wrong} are not validation patients of the fixed split; "
                f"validation patients: {sorted(known)} (or leave the setting unset)"
            )
        validation = [s for s in validation if s.patient in set(validation_patients)]
    if not train:
        raise ConfigError("the data has split roles but no slice with the training role")
    return train, validation


def pick_validation(validation: list[CTSlice], count: int) -> list[CTSlice]:
    """At most ``count`` validation slices, shared out over the patients (each gets about the same number,
    spread evenly over its slices), so a single-slice patient is validated as well as a long series."""
    by_patient: dict[str, list[CTSlice]] = {}
    for s in validation:
        by_patient.setdefault(s.patient, []).append(s)
    quota = dict.fromkeys(by_patient, 0)
    remaining = min(count, len(validation))
    while remaining:
        for p in sorted(by_patient, key=lambda p: (quota[p], p)):
            if quota[p] < len(by_patient[p]):
                quota[p] += 1
                remaining -= 1
                break
    picked = []
    for p, members in by_patient.items():
        if quota[p]:
            picked += [members[i] for i in np.unique(np.linspace(0, len(members) - 1, quota[p]).round().astype(int))]
    return picked


def simulate_low_dose(
    slices: list[CTSlice], config: DataConfig, seed: int, device: str, dose: float | None = None
) -> list[np.ndarray]:
    """Low-dose partner of every slice: the real one when present, else simulated (at ``dose``, or a dose
    drawn per slice from the config's range)."""
    rng = np.random.default_rng(seed)
    lows = []
    for index, s in enumerate(slices):
        if s.low is not None:
            lows.append(s.low)
            continue
        d = dose if dose is not None else draw_dose(config, rng)
        lows.append(simulate_slice(s.full, s.spacing_mm, dose=d, seed=seed * 100_003 + index, device=device))
    return lows


def draw_dose(config: DataConfig, rng: np.random.Generator) -> float:
    """A training dose: uniform in ``[dose, dose_max]``, or ``dose`` when no range is set."""
    if config.dose_max is None or config.dose_max == config.dose:
        return float(config.dose)
    return float(rng.uniform(config.dose, config.dose_max))


def simulate_on_device(full_hu: torch.Tensor, spacing_mm: tuple[float, float], dose: float, seed: int) -> torch.Tensor:
    """Low-dose realisation of ``full_hu (N, H, W)`` HU on its own device, returned there, ``(N, H, W)`` HU.

    The one place training calls the simulator. One generator on the slices' own device draws the whole batch:
    an integer seed would make the simulator draw per-slice noise on the CPU and copy it over (slow on a GPU).
    """
    generator = torch.Generator(device=full_hu.device).manual_seed(seed)
    low = simulate_batch(full_hu, spacing_mm, dose, seed=generator, device=full_hu.device)
    return torch.as_tensor(low).to(full_hu.device, non_blocking=True)


@dataclass(frozen=True)
class _SliceView:
    """A training slice as one batch sees it: normal-dose HU ``(H, W)``, body patch centres ``(N, 2)`` (row,
    column) and pixel spacing in mm."""

    full: torch.Tensor
    centres: torch.Tensor
    spacing_mm: tuple[float, float]


@dataclass
class TrainingData:
    """Patches with fresh noise for training and whole slices for validation, on ``device``.

    Attributes:
        train: the training slices (``which`` of :meth:`batch` indexes them).
        validation: the validation slices, each once per validation dose.
        validation_low: their low-dose partners (HU), fixed for the whole run.
        validation_dose: the dose of each validation entry.
    """

    train: list[CTSlice]
    validation: list[CTSlice]
    validation_low: list[np.ndarray]
    validation_dose: list[float]
    sampler: PatchSampler
    language: dict | None
    config: DataConfig
    device: torch.device
    seed: int
    rng: np.random.Generator = field(default=None)
    batches: int = 0

    @classmethod
    def build(
        cls, config: DataConfig, device: torch.device, seed: int, rank: int = 0, validation_slices: int = 8
    ) -> TrainingData:
        slices, language = load_slices(config)
        train, validation = split_slices(slices, config, seed)
        validation = pick_validation(validation, validation_slices)
        logger.info(
            "training on %d slices of %d patients; validating on %d slices of %d patients",
            len(train),
            len({s.patient for s in train}),
            len(validation),
            len({s.patient for s in validation}),
        )
        simulation_device = "cuda" if device.type == "cuda" else "cpu"
        # Validation noise is drawn once per dose with a fixed seed so scores are comparable across steps.
        val_slices, val_low, val_dose = [], [], []
        for k, dose in enumerate(config.validation_doses):
            val_low += simulate_low_dose(
                validation, config, seed=10_000 + 17 * k + seed, device=simulation_device, dose=dose
            )
            val_slices += validation
            val_dose += [dose] * len(validation)
        # The sampler holds the normal-dose slices (HU, padded to at least one patch) and body patch centres.
        images = [torch.as_tensor(s.full, dtype=torch.float32)[None].to(device) for s in train]
        sampler = PatchSampler(images, [s.full for s in train], config.patch_size, seed=seed * 1000 + rank)
        rng = np.random.default_rng([seed, rank, 7919])
        return cls(
            train=train,
            validation=val_slices,
            validation_low=val_low,
            validation_dose=val_dose,
            sampler=sampler,
            language=language,
            config=config,
            device=device,
            seed=seed * 1000 + rank,
            rng=rng,
        )

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(low, full, slice_indices)``: patches (B, 1, P, P) in model range with noise never used before, and
        the training slice of each patch."""
        generator = self.sampler.generator
        zoom = draw_zoom(self.config.zoom, generator)
        # An enlarged slice costs zoom² times as much to simulate (the simulator's time grows with the pixel count):
        # it gives zoom² times as many patches, so a batch costs about the same at every zoom.
        per_slice = max(self.config.patches_per_slice, round(self.config.patches_per_slice * zoom**2))
        count = math.ceil(batch_size / per_slice)
        chosen = torch.randint(0, len(self.train), (count,), generator=generator).tolist()
        views = [self._view(index, zoom) for index in chosen]
        lows = self._low_dose(chosen, views)
        half, size = self.config.patch_size // 2, self.config.patch_size
        patches, which = [], []
        for index, view, low in zip(chosen, views, lows):
            picks = torch.randint(0, len(view.centres), (per_slice,), generator=generator)
            for row, col in view.centres[picks].tolist():
                window = (slice(row - half, row - half + size), slice(col - half, col - half + size))
                patches.append(torch.stack([low[window], view.full[window]]))
                which.append(index)
        batch = augment(torch.stack(patches[:batch_size]), generator)
        batch = hu_to_model(batch)
        self.batches += 1
        return batch[:, :1].contiguous(), batch[:, 1:].contiguous(), which[:batch_size]

    def _view(self, index: int, zoom: float) -> _SliceView:
        """Training slice ``index`` as this batch sees it: softened and zoomed (:mod:`.appearance`) when the
        config asks for it, with its pixel spacing and body patch centres moved along. Slices with a real
        low-dose partner stay as scanned (the partner cannot be changed to match)."""
        s, full, centres = self.train[index], self.sampler.images[index][0], self.sampler.centres[index]
        spacing = tuple(float(v) for v in s.spacing_mm)
        if s.low is not None:
            return _SliceView(full, centres, spacing)
        soften_mm = draw_soften_mm(self.config.soften_probability, self.config.soften_sigma_mm, self.sampler.generator)
        if soften_mm > 0:
            full = gaussian_blur(full, soften_mm / min(spacing))
        if zoom == 1.0:
            return _SliceView(full, centres, spacing)
        full = zoom_slice(full, zoom)
        size = self.config.patch_size
        pad_h, pad_w = max(0, size - full.shape[0]), max(0, size - full.shape[1])
        if pad_h or pad_w:
            full = torch.nn.functional.pad(full, (0, pad_w, 0, pad_h), value=AIR_HU)
        half = size // 2
        limits = torch.tensor([full.shape[0] - (size - half), full.shape[1] - (size - half)])
        moved = torch.minimum(torch.clamp((centres.float() * zoom).round().long(), min=half), limits)
        return _SliceView(full, moved, (spacing[0] / zoom, spacing[1] / zoom))

    def _low_dose(self, chosen: list[int], views: list[_SliceView] | None = None) -> list[torch.Tensor]:
        """Fresh low-dose HU ``(H, W)`` of each chosen slice's view (default: as scanned), simulated together per
        pixel spacing (each group at its own dose); real low-dose partners where the data has them.

        Slices of one spacing but different sizes (body crops) are centred on one air (-1000 HU) canvas for the
        simulation and cut back out: air attenuates nothing, so the padding does not change the noise.
        """
        if views is None:
            views = [self._view(index, 1.0) for index in chosen]
        lows: list[torch.Tensor | None] = [None] * len(chosen)
        groups: dict[tuple, list[int]] = {}
        for k, (index, view) in enumerate(zip(chosen, views)):
            if self.train[index].low is not None:
                lows[k] = self._real_low(index)
            else:
                groups.setdefault(view.spacing_mm, []).append(k)
        for spacing, members in groups.items():
            images = [views[k].full for k in members]
            height, width = max(i.shape[0] for i in images), max(i.shape[1] for i in images)
            stack = images[0].new_full((len(images), height, width), AIR_HU)
            boxes = []
            for n, image in enumerate(images):
                top, left = (height - image.shape[0]) // 2, (width - image.shape[1]) // 2
                stack[n, top : top + image.shape[0], left : left + image.shape[1]] = image
                boxes.append((slice(top, top + image.shape[0]), slice(left, left + image.shape[1])))
            dose = draw_dose(self.config, self.rng)
            seed = int(self.rng.integers(0, 2**62))
            simulated = simulate_on_device(stack, spacing, dose, seed)
            for k, image, box in zip(members, simulated, boxes):
                lows[k] = image[box]
        return lows

    def _real_low(self, index: int) -> torch.Tensor:
        full = self.sampler.images[index][0]
        low = torch.as_tensor(self.train[index].low, dtype=torch.float32, device=full.device)
        pad_h, pad_w = full.shape[0] - low.shape[0], full.shape[1] - low.shape[1]
        if pad_h or pad_w:
            low = torch.nn.functional.pad(low[None, None], (0, pad_w, 0, pad_h), mode="reflect")[0, 0]
        return low

    def validation_fingerprint(self) -> str:
        """Identifies the validation set (slices, doses, noise), so a resumed run knows whether its best score
        so far is comparable."""
        digest = hashlib.sha256()
        for s, low, dose in zip(self.validation, self.validation_low, self.validation_dose):
            digest.update(f"{s.patient}|{s.full.shape}|{dose}|".encode())
            digest.update(np.ascontiguousarray(low[::16, ::16], np.float32).tobytes())
        return digest.hexdigest()[:16]

    def state(self) -> dict:
        """What resuming needs to continue the same stream of patches and noise."""
        return {
            "sampler_rng": self.sampler.generator.get_state(),
            "noise_rng": self.rng.bit_generator.state,
            "batches": self.batches,
            "validation": self.validation_fingerprint(),
        }

    def restore(self, state: dict) -> None:
        self.sampler.generator.set_state(torch.as_tensor(state["sampler_rng"]).cpu())
        if "noise_rng" in state:
            self.rng.bit_generator.state = state["noise_rng"]
        self.batches = int(state.get("batches", 0))
