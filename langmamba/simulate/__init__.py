"""Physics-based lower-dose CT simulation.

A normal-dose slice (HU) is turned into attenuation, projected along the rays of a clinical-like
fan-beam scanner, given quantum + electronic noise in the count domain at a fraction of the dose,
rebinned to parallel beam and reconstructed by filtered back-projection. Everything runs in torch
on CPU or CUDA.

Public API:

- :class:`FanBeamGeometry`: the scanner (distances, channels, views); :class:`ScanProtocol`: every
  setting of a simulated scan that is not per slice, as one config.
- :func:`simulate_slice`, :func:`simulate_batch`, :func:`simulate_volume`: the simulation.
- :func:`fan_beam_project`, :func:`rebin_fan_to_parallel`, :func:`fbp_parallel`: the exact pieces.
- :func:`projection_noise`, :func:`added_count_variance`: the noise model; :class:`LowSignalFilter`:
  the scanner's handling of photon-starved rays.
- :class:`BowtieFilter`, :class:`TubeCurrentModulation`: how many photons each ray gets.
- :func:`native_incident_photons`, :func:`calibrate_volume`, :func:`estimate_noise`: dose relative
  to the scan's own noise.
- :func:`noise_power_spectrum`, :func:`compare_nps`: noise texture.
"""

from langmamba.simulate.calibration import (
    Calibration,
    NoiseEstimate,
    VolumeCalibration,
    calibrate_volume,
    estimate_noise,
    native_incident_photons,
)
from langmamba.simulate.exposure import BowtieFilter, TubeCurrentModulation, water_equivalent_diameter
from langmamba.simulate.fbp import WINDOWS, fbp_parallel, ramp_filter
from langmamba.simulate.geometry import FanBeamGeometry
from langmamba.simulate.noise import LowSignalFilter, added_count_variance, low_dose_counts, projection_noise
from langmamba.simulate.nps import NoisePowerSpectrum, compare_nps, noise_power_spectrum
from langmamba.simulate.projector import fan_beam_project
from langmamba.simulate.protocol import ELECTRONIC_NOISE, MU_WATER_PER_MM, RECONSTRUCTIONS, ScanProtocol
from langmamba.simulate.rebin import rebin_fan_to_parallel
from langmamba.simulate.simulator import (
    FULL_DOSE_PHOTONS,
    derive_slice_seeds,
    hu_to_mu,
    mu_to_hu,
    simulate_batch,
    simulate_slice,
    z_modulation,
)
from langmamba.simulate.volume import simulate_volume, slice_photons

__all__ = [
    "BowtieFilter",
    "Calibration",
    "LowSignalFilter",
    "NoiseEstimate",
    "NoisePowerSpectrum",
    "TubeCurrentModulation",
    "VolumeCalibration",
    "calibrate_volume",
    "compare_nps",
    "estimate_noise",
    "native_incident_photons",
    "noise_power_spectrum",
    "slice_photons",
    "water_equivalent_diameter",
    "z_modulation",
    "ELECTRONIC_NOISE",
    "FULL_DOSE_PHOTONS",
    "MU_WATER_PER_MM",
    "RECONSTRUCTIONS",
    "ScanProtocol",
    "WINDOWS",
    "FanBeamGeometry",
    "added_count_variance",
    "derive_slice_seeds",
    "fan_beam_project",
    "fbp_parallel",
    "hu_to_mu",
    "low_dose_counts",
    "mu_to_hu",
    "projection_noise",
    "ramp_filter",
    "rebin_fan_to_parallel",
    "simulate_batch",
    "simulate_slice",
    "simulate_volume",
]
