"""Where the photons go: bowtie filter across the fan, tube-current modulation over views and slices.

The incident photons of ray ``(view β, channel γ)`` of slice ``z`` are::

    I0(z, β, γ) = I0 · f_z · m_z(β) · b(γ)

with ``I0`` the photons of the central ray at the average tube current, ``b`` the bowtie transmission
(1 at the centre), ``m_z`` the angular modulation (mean 1 over the views of a slice: the mAs is
unchanged) and ``f_z`` the longitudinal modulation (mean 1 over the slices of a volume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError
from langmamba.simulate.geometry import FanBeamGeometry


@dataclass(frozen=True)
class BowtieFilter:
    """A body bowtie: extra water-equivalent thickness that grows towards the edges of the fan.

    Its shape compensates a water cylinder of radius ``design_radius_mm`` (the thickness at ray
    distance ``s = R sin γ`` from the isocentre is that cylinder's central chord minus its chord at
    ``s``), capped at ``max_water_mm``. The defaults (a 40 cm design object, at most 10 cm of water)
    give a relative flux of about 0.8 at 5 cm, 0.35 at 10 cm and 0.15 beyond 13 cm from the isocentre,
    the range of published large-body bowtie profiles; no vendor's exact filter is modelled.

    Args:
        design_radius_mm: radius of the water cylinder the filter flattens (mm).
        max_water_mm: thickest part of the filter, in mm of water.
    """

    design_radius_mm: float = 200.0
    max_water_mm: float = 100.0

    def __post_init__(self) -> None:
        for name in ("design_radius_mm", "max_water_mm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ConfigError(f"BowtieFilter.{name} must be a length >= 0 in mm, got {value!r}")

    def water_mm(self, geometry: FanBeamGeometry, device: torch.device | str = "cpu") -> torch.Tensor:
        """Water-equivalent thickness for every channel, ``(n_channels,)`` float32, mm."""
        s = geometry.source_to_isocenter_mm * torch.sin(geometry.channel_angles(device))
        r = self.design_radius_mm
        chord = 2.0 * (r**2 - s**2).clamp_min(0.0).sqrt()
        return (2.0 * r - chord).clamp(max=self.max_water_mm).float()

    def transmission(
        self, geometry: FanBeamGeometry, mu_water_per_mm: float, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Relative flux behind the filter for every channel, ``(n_channels,)`` float32, 1 at the centre."""
        return torch.exp(-mu_water_per_mm * self.water_mm(geometry, device))


@dataclass(frozen=True)
class TubeCurrentModulation:
    """Tube current that follows the patient's attenuation, as automatic exposure control does.

    Angular: in each view the tube current is proportional to ``exp(angular_exponent · p_ref)``, where
    ``p_ref`` is the view's largest line integral (averaged over ``reference_channels`` neighbouring
    channels so that a single bone ray does not drive it). The exponent 0.5 is the rule of Gies et al.
    (Med Phys 26(11), 1999): mA ∝ √(attenuation) minimises the image noise at a fixed mAs. The current is
    normalised to mean 1 over the views, so the dose of the slice is unchanged.

    Longitudinal (z): slice ``z`` gets ``exp(z_exponent · μ_w · D_w(z))``, with ``D_w`` the slice's
    water-equivalent diameter (AAPM Report 220), normalised to mean 1 over the slices of a volume.
    ``max_ratio`` caps the largest to smallest tube current of either kind, as the scanner's
    tube-current limits do.

    Args:
        angular_exponent: exponent of the view's attenuation; 0 turns angular modulation off.
        z_exponent: exponent of the slice's attenuation; 0 turns z modulation off.
        reference_channels: channels averaged when taking a view's largest line integral.
        max_ratio: largest allowed ratio of the highest to the lowest tube current.
    """

    angular_exponent: float = 0.5
    z_exponent: float = 0.5
    reference_channels: int = 9
    max_ratio: float = 20.0

    def __post_init__(self) -> None:
        for name in ("angular_exponent", "z_exponent"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value <= 2):
                raise ConfigError(f"TubeCurrentModulation.{name} must be in [0, 2], got {value!r}")
        if not (isinstance(self.reference_channels, int) and self.reference_channels >= 1):
            raise ConfigError(
                f"TubeCurrentModulation.reference_channels must be an integer >= 1, got {self.reference_channels!r}"
            )
        if not (isinstance(self.max_ratio, (int, float)) and self.max_ratio >= 1):
            raise ConfigError(f"TubeCurrentModulation.max_ratio must be >= 1, got {self.max_ratio!r}")

    def angular(self, line_integrals: torch.Tensor) -> torch.Tensor:
        """Relative tube current per view from the clean sinogram ``(N, V, C)``; ``(N, V)`` float32, mean 1."""
        n, n_views, n_channels = line_integrals.shape
        if self.angular_exponent == 0:
            return torch.ones(n, n_views, dtype=torch.float32, device=line_integrals.device)
        width = min(self.reference_channels, n_channels)
        smooth = F.avg_pool1d(line_integrals.float().reshape(n * n_views, 1, n_channels), width, stride=1)
        p_ref = smooth.amax(dim=(1, 2)).reshape(n, n_views)
        return _normalised(self.angular_exponent * p_ref, self.max_ratio, dim=1)

    def longitudinal(self, water_diameter_mm: torch.Tensor, mu_water_per_mm: float) -> torch.Tensor:
        """Relative tube current per slice from ``D_w`` ``(Z,)`` mm; ``(Z,)`` float32, mean 1."""
        if self.z_exponent == 0:
            return torch.ones_like(water_diameter_mm, dtype=torch.float32)
        return _normalised(self.z_exponent * mu_water_per_mm * water_diameter_mm.float(), self.max_ratio, dim=0)


def _normalised(log_current: torch.Tensor, max_ratio: float, dim: int) -> torch.Tensor:
    """``exp(log_current)`` capped at ``max_ratio`` × its smallest value, divided by its mean along ``dim``."""
    log_current = log_current - log_current.amin(dim=dim, keepdim=True)
    current = torch.exp(log_current.clamp(max=math.log(max_ratio)))
    return current / current.mean(dim=dim, keepdim=True)


def water_equivalent_diameter(hu: torch.Tensor, pixel_area_mm2: float, threshold_hu: float = -500.0) -> torch.Tensor:
    """AAPM Report 220 water-equivalent diameter of each slice, ``(N, H, W)`` HU → ``(N,)`` mm.

    ``D_w = 2 √(Σ (HU / 1000 + 1) · a / π)`` over the pixels above ``threshold_hu`` (the patient; the
    surrounding air adds nothing), ``a`` the pixel area in mm².
    """
    inside = (hu > threshold_hu).float()
    area = ((hu.clamp_min(-1000.0) / 1000.0 + 1.0) * inside).sum(dim=(-2, -1)) * pixel_area_mm2
    return 2.0 * torch.sqrt(area / math.pi)
