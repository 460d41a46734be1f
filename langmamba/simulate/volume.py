"""Lower-dose simulation of a whole volume: per-slice seeds, batches and the dose of each slice.

Above both the slice simulator and the noise calibration, which it joins for ``incident_photons="native"``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from langmamba.errors import ConfigError
from langmamba.simulate._tensor import per_slice
from langmamba.simulate.calibration import calibrate_volume
from langmamba.simulate.exposure import TubeCurrentModulation
from langmamba.simulate.simulator import MU_WATER_PER_MM, derive_slice_seeds, simulate_batch, z_modulation

if TYPE_CHECKING:  # the simulation itself needs none of langmamba.io's readers
    from langmamba.io.volume import CTVolume

logger = logging.getLogger(__name__)


def simulate_volume(
    volume: CTVolume,
    dose: float = 0.25,
    *,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 4,
    incident_photons: str | float | Sequence[float] | np.ndarray = "native",
    modulation: TubeCurrentModulation | None = TubeCurrentModulation(),
    **kwargs,
) -> CTVolume:
    """Simulate a lower-dose scan of every axial slice of ``volume``.

    Slice ``z`` uses the seed ``derive_slice_seeds(seed, Z)[z]`` whatever the batch size, so results
    do not depend on ``batch_size``. The in-plane spacing may differ between rows and columns. The
    tube current follows the patient along ``z`` as well as around it (``modulation``).

    Args:
        volume: the normal-dose volume (``hu`` is ``(Z, Y, X)``, ``spacing`` is ``(x, y, z)`` mm).
        dose: fraction of the dose, in (0, 1].
        seed: integer seed.
        progress: show a tqdm progress bar over slices.
        batch_size: slices simulated together (memory grows linearly with it).
        incident_photons: ``"native"`` (default): solved from the volume's own noise so that ``dose``
            multiplies its noise variance by ``1 / dose``
            (:func:`~langmamba.simulate.calibration.calibrate_volume`); a number: ``I0`` at the volume's
            mean tube current, shared out along ``z`` by ``modulation``; ``Z`` numbers: ``I0`` of each
            slice, used as given.
        modulation: tube-current modulation (angular and along ``z``); ``None``: constant current.
        **kwargs: any other keyword of :func:`simulate_slice` (geometry, bowtie, low_signal,
            reconstruction, device, ...).

    Returns:
        A copy of ``volume`` (same geometry and header) with simulated HU.
    """
    if "seed" in kwargs:
        raise ConfigError("pass seed once")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"simulate_volume needs an integer seed, got {seed!r}")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    n_slices = volume.hu.shape[0]
    spacing = (volume.spacing[1], volume.spacing[0])  # (row, column) = (y, x)
    photons = slice_photons(volume, dose, incident_photons, modulation=modulation, seed=seed, **kwargs)
    seeds = derive_slice_seeds(int(seed), n_slices)
    out = np.empty_like(volume.hu, dtype=np.float32)
    starts = range(0, n_slices, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="simulating low dose", unit="batch")
    for start in starts:
        stop = min(start + batch_size, n_slices)
        out[start:stop] = simulate_batch(
            volume.hu[start:stop],
            spacing,
            dose,
            seed=list(seeds[start:stop]),
            incident_photons=photons[start:stop],
            modulation=modulation,
            **kwargs,
        )
        logger.debug("simulated slices %d-%d of %d", start, stop - 1, n_slices)
    return volume.with_hu(out)


def slice_photons(
    volume: CTVolume,
    dose: float,
    incident_photons: str | float | Sequence[float] | np.ndarray = "native",
    *,
    modulation: TubeCurrentModulation | None = TubeCurrentModulation(),
    seed: int = 0,
    **kwargs,
) -> np.ndarray:
    """``I0`` of every slice of ``volume``, ``(Z,)`` float64; see :func:`simulate_volume` for the arguments."""
    n_slices = volume.hu.shape[0]
    if isinstance(incident_photons, str):
        if incident_photons != "native":
            raise ConfigError(f"incident_photons must be 'native', a number or one per slice, got {incident_photons!r}")
        calibration = calibrate_volume(volume, dose, modulation=modulation, seed=seed, **kwargs)
        logger.info("%s", calibration.line())
        return calibration.incident_photons
    if np.ndim(incident_photons) > 0:
        return per_slice(incident_photons, n_slices, "incident_photons").numpy()
    value = float(per_slice(incident_photons, 1, "incident_photons")[0])
    return value * z_modulation(volume, modulation, kwargs.get("mu_water_per_mm", MU_WATER_PER_MM))
