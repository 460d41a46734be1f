"""Count-domain CT noise: quantum (Poisson) and electronic (Gaussian) noise of a lower-dose scan.

Detector model: a ray of line integral ``p`` seen with ``I0`` incident photons at full dose records
``I = I0 · exp(-p)`` photons on average, plus zero-mean electronic noise of standard deviation
``σ_e`` counts. At dose fraction ``a`` (tube current × time scaled by ``a``) the mean is ``a · I`` and
the variance ``a · I + σ_e²``.

Two ways to reach that scan:

- *Relative* (default; Yu et al., "Development and validation of a practical lower-dose-simulation
  tool for optimizing CT scan protocols", J Comput Assist Tomogr 36(4), 2012): the input is a real
  full-dose scan, which already carries variance ``a² · (I + σ_e²)`` once scaled to dose ``a``.
  Only the difference is added::

      I_low = a · I + ε,   ε ~ N(0, var_added),   var_added = a (1 - a) · I + (1 - a²) · σ_e²

  so that ``Var(I_low) = a · I + σ_e²``. ``I`` is estimated from the full-dose image's projection.
- *Noise-free input* (phantoms): ``I_low = Poisson(a · I) + N(0, σ_e²)``.

Either way the noisy line integral is ``-log(max(I_low, MIN_COUNTS) / (a · I0))``.
"""

from __future__ import annotations

import math

import torch

from langmamba.errors import ConfigError

# Counts at or below zero (photon starvation plus electronic noise) are floored before the log,
# as a scanner's log stage must; one photon keeps p finite (p <= log(a · I0)).
MIN_COUNTS = 1.0


def added_count_variance(expected_counts: torch.Tensor, dose: float, electronic_noise: float) -> torch.Tensor:
    """``a (1 - a) · I + (1 - a²) · σ_e²``: counts² to add to a full-dose scan scaled by ``a``.

    ``expected_counts`` is ``I`` (any shape), ``dose`` is ``a``, ``electronic_noise`` is ``σ_e`` in counts.
    """
    return dose * (1.0 - dose) * expected_counts + (1.0 - dose**2) * electronic_noise**2


def low_dose_counts(
    expected_counts: torch.Tensor,
    dose: float,
    electronic_noise: float,
    *,
    input_is_noise_free: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw detector counts of a scan at dose fraction ``dose``.

    Args:
        expected_counts: ``I``, mean full-dose counts per ray, any shape (float32).
        dose: ``a`` in (0, 1].
        electronic_noise: ``σ_e``, electronic noise standard deviation in counts.
        input_is_noise_free: ``False`` → relative mode (add only the missing variance);
            ``True`` → Poisson at ``a · I`` plus full electronic noise.
        generator: source of randomness. Noise is drawn on the generator's device and moved to
            that of ``expected_counts``, so a CPU generator gives the same draws on any device.

    Returns:
        float32 noisy counts, same shape and device as ``expected_counts`` (may be <= 0).
    """
    noise_device = generator.device if generator is not None else expected_counts.device
    mean = dose * expected_counts
    if input_is_noise_free:
        quanta = torch.poisson(mean.to(noise_device, torch.float32), generator=generator).to(mean.device)
        electronic = torch.randn(mean.shape, generator=generator, device=noise_device).to(mean.device)
        return quanta + electronic_noise * electronic
    std = added_count_variance(expected_counts, dose, electronic_noise).clamp_min(0.0).sqrt()
    gauss = torch.randn(mean.shape, generator=generator, device=noise_device).to(mean.device)
    return mean + std * gauss


def projection_noise(
    clean_projection: torch.Tensor,
    dose: float,
    incident_photons: float,
    electronic_noise: float,
    *,
    input_is_noise_free: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise ``n = p_low - p`` to add to line integrals ``p`` to reach dose fraction ``dose``.

    Args:
        clean_projection: ``p``, line integrals (unitless), any shape; with the relative mode this is
            the projection of the full-dose image, which only sets the noise level.
        dose, electronic_noise, input_is_noise_free, generator: see :func:`low_dose_counts`.
        incident_photons: ``I0``, full-dose photons per ray (detector channel and view) in air;
            ``math.inf`` turns noise off (returns zeros).

    Returns:
        float32 tensor like ``clean_projection``. Its mean is not exactly zero: the log of noisy counts
        is biased upwards at low counts, as in real data.
    """
    if math.isinf(incident_photons):
        return torch.zeros_like(clean_projection, dtype=torch.float32)
    expected = incident_photons * torch.exp(-clean_projection.float())
    counts = low_dose_counts(
        expected, dose, electronic_noise, input_is_noise_free=input_is_noise_free, generator=generator
    )
    # p_low - p = -log(I_low / (a I0)) + log(I / I0) = -log(I_low / (a I)). A real full-dose input
    # already went through the floor, so the relative mode floors the reference too (dose 1 adds nothing).
    mean = dose * expected
    reference = mean.clamp_min(1e-30) if input_is_noise_free else mean.clamp_min(MIN_COUNTS)
    return torch.log(reference) - torch.log(counts.clamp_min(MIN_COUNTS))


def check_noise_args(dose: float, incident_photons: float, electronic_noise: float) -> None:
    """Raise :class:`ConfigError` naming the bad argument."""
    if not (_is_number(dose) and math.isfinite(dose) and 0 < dose <= 1):
        raise ConfigError(f"dose must be a fraction of the full dose in (0, 1] (0.25: quarter), got {dose!r}")
    if not (_is_number(incident_photons) and incident_photons > 0):
        raise ConfigError(f"incident_photons must be photons per ray > 0 (or inf), got {incident_photons!r}")
    if not (_is_number(electronic_noise) and math.isfinite(electronic_noise) and electronic_noise >= 0):
        raise ConfigError(f"electronic_noise must be a standard deviation >= 0, got {electronic_noise!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
