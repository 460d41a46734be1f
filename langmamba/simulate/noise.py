"""Count-domain CT noise: quantum (Poisson) and electronic (Gaussian) noise of a lower-dose scan.

Detector model: a ray of line integral ``p`` seen with ``I0`` incident photons at full dose records
``I = I0 · exp(-p)`` photons on average, plus zero-mean electronic noise of standard deviation
``σ_e`` counts. At dose fraction ``a`` (tube current × time scaled by ``a``) the mean is ``a · I`` and
the variance ``a · I + σ_e²``. ``I0`` may differ from ray to ray (bowtie filter, tube-current
modulation: :mod:`langmamba.simulate.exposure`).

Two ways to reach that scan:

- *Relative* (default; Yu et al., "Development and validation of a practical lower-dose-simulation
  tool for optimizing CT scan protocols", J Comput Assist Tomogr 36(4), 2012): the input is a real
  full-dose scan, which already carries variance ``a² · (I + σ_e²)`` once scaled to dose ``a``.
  Only the difference is added::

      I_low = a · I + ε,   ε ~ N(0, var_added),   var_added = a (1 - a) · I + (1 - a²) · σ_e²

  so that ``Var(I_low) = a · I + σ_e²``. ``I`` is estimated from the full-dose image's projection.
- *Noise-free input* (phantoms): ``I_low = Poisson(a · I) + N(0, σ_e²)``.

Photon-starved rays are then treated as a scanner's low-signal correction does
(:class:`LowSignalFilter`: the noise of a ray with too few counts is averaged over neighbouring
channels), and the noisy line integral is ``-log(max(I_low, MIN_COUNTS) / (a · I0))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError

# Counts at or below zero (photon starvation plus electronic noise) are floored before the log,
# as a scanner's log stage must; one photon keeps p finite (p <= log(a · I0)).
MIN_COUNTS = 1.0

Number = float | torch.Tensor
Generators = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class LowSignalFilter:
    """Adaptive channel smoothing of photon-starved rays, the low-signal correction of clinical scanners.

    After Hsieh ("Adaptive streak artifact reduction in computed tomography resulting from excessive
    x-ray photon noise", Med Phys 25(11), 1998): a ray whose low-dose signal-to-noise ratio is too low
    has its noise averaged over a window of neighbouring channels just wide enough that the window
    holds ``min_effective_counts`` effective photons, ``k · (a I)² / (a I + σ_e²) >= min_effective_counts``
    for a window of ``k`` channels (at most ``max_channels``). Rays with enough photons are untouched.
    Without it, rays through a wide body seen from the side (a few photons each) become ±1000 HU
    streaks that no real scanner shows.

    Args:
        min_effective_counts: effective photons a ray (after averaging) must hold; 0 turns the filter off.
        max_channels: widest averaging window, channels (odd).
    """

    min_effective_counts: float = 20.0
    max_channels: int = 33

    def __post_init__(self) -> None:
        if not (isinstance(self.min_effective_counts, (int, float)) and 0 <= self.min_effective_counts < 1e6):
            raise ConfigError(
                f"LowSignalFilter.min_effective_counts must be photons >= 0, got {self.min_effective_counts!r}"
            )
        if not (isinstance(self.max_channels, int) and self.max_channels >= 1 and self.max_channels % 2 == 1):
            raise ConfigError(f"LowSignalFilter.max_channels must be an odd integer >= 1, got {self.max_channels!r}")

    def half_widths(self, mean_counts: torch.Tensor, electronic_noise: float) -> torch.Tensor:
        """Half-width ``h`` (window ``2h + 1`` channels) for each ray, int64, like ``mean_counts`` (``a I``)."""
        mean = mean_counts.float().clamp_min(1e-3)
        snr2 = mean**2 / (mean + electronic_noise**2)
        channels = (self.min_effective_counts / snr2).clamp(max=float(self.max_channels))
        return torch.ceil((channels - 1.0) / 2.0).clamp_min(0.0).long()

    def apply(self, noise_counts: torch.Tensor, mean_counts: torch.Tensor, electronic_noise: float) -> torch.Tensor:
        """Average ``noise_counts`` ``(..., C)`` over the channel window each ray needs; same shape, float32."""
        if self.min_effective_counts == 0 or self.max_channels == 1:
            return noise_counts
        half = self.half_widths(mean_counts, electronic_noise).expand_as(noise_counts)
        if not bool((half > 0).any()):
            return noise_counts
        return _variable_box_mean(noise_counts, half)


def _variable_box_mean(values: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[..., j - h_j : j + h_j + 1]`` along the last axis (window clipped at the ends)."""
    n = values.shape[-1]
    cumulative = F.pad(values.double().cumsum(-1), (1, 0))  # float64: the sums of many rays stay exact
    j = torch.arange(n, device=values.device)
    lo = (j - half).clamp_min(0)
    hi = (j + half + 1).clamp_max(n)
    total = cumulative.gather(-1, hi) - cumulative.gather(-1, lo)
    return (total / (hi - lo)).float()


def added_count_variance(expected_counts: torch.Tensor, dose: Number, electronic_noise: float) -> torch.Tensor:
    """``a (1 - a) · I + (1 - a²) · σ_e²``: counts² to add to a full-dose scan scaled by ``a``.

    ``expected_counts`` is ``I`` (any shape), ``dose`` is ``a`` (a number or a tensor broadcastable to
    ``I``), ``electronic_noise`` is ``σ_e`` in counts.
    """
    return dose * (1.0 - dose) * expected_counts + (1.0 - dose**2) * electronic_noise**2


def standard_normal(shape: Sequence[int], generator: Generators, device: torch.device) -> torch.Tensor:
    """``N(0, 1)`` draws of ``shape`` on ``device``; a list of generators draws item ``i`` from generator ``i``.

    Noise is drawn on each generator's device and moved, so a CPU generator gives the same draws on
    any device; one generator (or ``None``: torch's default one) draws the whole batch in one call.
    """
    shape = tuple(shape)
    if generator is None or isinstance(generator, torch.Generator):
        noise_device = generator.device if generator is not None else device
        return torch.randn(shape, generator=generator, device=noise_device).to(device)
    _check_generators(generator, shape)
    return torch.stack([torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generator])


def _poisson(rate: torch.Tensor, generator: Generators) -> torch.Tensor:
    if generator is None or isinstance(generator, torch.Generator):
        noise_device = generator.device if generator is not None else rate.device
        return torch.poisson(rate.to(noise_device), generator=generator).to(rate.device)
    _check_generators(generator, tuple(rate.shape))
    return torch.stack([torch.poisson(r.to(g.device), generator=g).to(rate.device) for r, g in zip(rate, generator)])


def _check_generators(generators: Sequence[torch.Generator], shape: tuple[int, ...]) -> None:
    if not shape or len(generators) != shape[0]:
        raise ConfigError(f"got {len(generators)} generators for noise of shape {shape} (one per item needed)")


def low_dose_counts(
    expected_counts: torch.Tensor,
    dose: Number,
    electronic_noise: float,
    *,
    input_is_noise_free: bool = False,
    generator: Generators = None,
    low_signal: LowSignalFilter | None = None,
) -> torch.Tensor:
    """Draw detector counts of a scan at dose fraction ``dose``.

    Args:
        expected_counts: ``I``, mean full-dose counts per ray, ``(..., C)`` with channels last (float32).
        dose: ``a`` in (0, 1], a number or a tensor broadcastable to ``expected_counts``.
        electronic_noise: ``σ_e``, electronic noise standard deviation in counts.
        input_is_noise_free: ``False`` → relative mode (add only the missing variance);
            ``True`` → Poisson at ``a · I`` plus full electronic noise.
        generator: source of randomness, see :func:`standard_normal`.
        low_signal: averaging of the noise of photon-starved rays over channels; ``None``: none.

    Returns:
        float32 noisy counts, same shape and device as ``expected_counts`` (may be <= 0).
    """
    mean = dose * expected_counts
    if input_is_noise_free:
        quanta = _poisson(mean.float(), generator)
        electronic = standard_normal(mean.shape, generator, mean.device)
        noise = quanta - mean + electronic_noise * electronic
    else:
        std = added_count_variance(expected_counts, dose, electronic_noise).clamp_min(0.0).sqrt()
        noise = std * standard_normal(mean.shape, generator, mean.device)
    if low_signal is not None:
        noise = low_signal.apply(noise, mean, electronic_noise)
    return mean + noise


def projection_noise(
    clean_projection: torch.Tensor,
    dose: Number,
    incident_photons: Number,
    electronic_noise: float,
    *,
    input_is_noise_free: bool = False,
    generator: Generators = None,
    low_signal: LowSignalFilter | None = None,
) -> torch.Tensor:
    """Noise ``n = p_low - p`` to add to line integrals ``p`` to reach dose fraction ``dose``.

    Args:
        clean_projection: ``p``, line integrals (unitless), ``(..., C)`` with channels last; with the
            relative mode this is the projection of the full-dose image, which only sets the noise level.
        dose, electronic_noise, input_is_noise_free, generator, low_signal: see :func:`low_dose_counts`.
        incident_photons: ``I0``, full-dose photons per ray in air: a number, or a tensor broadcastable
            to ``p`` (bowtie, tube-current modulation); ``math.inf`` turns noise off (returns zeros).

    Returns:
        float32 tensor like ``clean_projection``. Its mean is not exactly zero: the log of noisy counts
        is biased upwards at low counts, as in real data.
    """
    if not isinstance(incident_photons, torch.Tensor) and math.isinf(incident_photons):
        return torch.zeros_like(clean_projection, dtype=torch.float32)
    expected = incident_photons * torch.exp(-clean_projection.float())
    counts = low_dose_counts(
        expected,
        dose,
        electronic_noise,
        input_is_noise_free=input_is_noise_free,
        generator=generator,
        low_signal=low_signal,
    )
    # p_low - p = -log(I_low / (a I0)) + log(I / I0) = -log(I_low / (a I)). A real full-dose input
    # already went through the floor, so the relative mode floors the reference too (dose 1 adds nothing).
    mean = dose * expected
    reference = mean.clamp_min(1e-30) if input_is_noise_free else mean.clamp_min(MIN_COUNTS)
    return torch.log(reference) - torch.log(counts.clamp_min(MIN_COUNTS))


def check_noise_args(dose: Number, incident_photons: Number, electronic_noise: float) -> None:
    """Raise :class:`ConfigError` naming the bad argument (numbers or tensors of values)."""
    if not _all_numbers(dose, lambda d: torch.isfinite(d) & (d > 0) & (d <= 1)):
        raise ConfigError(f"dose must be a fraction of the full dose in (0, 1] (0.25: quarter), got {dose!r}")
    if not _all_numbers(incident_photons, lambda i: ~torch.isnan(i) & (i > 0)):
        raise ConfigError(f"incident_photons must be photons per ray > 0 (or inf), got {incident_photons!r}")
    if not (_is_number(electronic_noise) and math.isfinite(electronic_noise) and electronic_noise >= 0):
        raise ConfigError(f"electronic_noise must be a standard deviation >= 0, got {electronic_noise!r}")


def _all_numbers(value: object, valid) -> bool:
    if isinstance(value, torch.Tensor):
        return value.numel() > 0 and not value.is_complex() and bool(valid(value.double()).all())
    return _is_number(value) and bool(valid(torch.tensor(float(value), dtype=torch.float64)))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
