"""Fan-beam scanner geometry and the parallel-beam grid it is rebinned to."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from langmamba.errors import ConfigError


@dataclass(frozen=True)
class FanBeamGeometry:
    """A third-generation CT scanner with an equiangular (curved) detector, one row.

    The defaults are a clinical-like 64-slice geometry (the Siemens SOMATOM Definition AS+ values
    published with the AAPM/Mayo Low-Dose CT Grand Challenge data, without flying focal spot or
    quarter-detector offset): a 500 mm scan field of view sampled by 736 channels and 1152 views
    over one 360° rotation.

    Coordinates: the isocentre is the image centre; ``x`` runs along image columns, ``y`` along
    image rows. The source sits at ``R (cos β, sin β)`` for view angle ``β = view * 2π / n_views``;
    channel ``j`` looks at fan angle ``γ_j = (j - (n_channels - 1) / 2) * Δγ`` from the central ray.

    Args:
        source_to_isocenter_mm: ``R``, distance from the focal spot to the rotation axis (mm).
        source_to_detector_mm: ``D``, distance from the focal spot to the detector arc (mm).
        n_channels: detector channels in the fan.
        detector_element_mm: channel pitch measured along the detector arc (mm), so
            ``Δγ = detector_element_mm / source_to_detector_mm`` rad.
        n_views: projections per full rotation (must be even: opposite views are paired when the
            data are rebinned to parallel beam).
    """

    source_to_isocenter_mm: float = 595.0
    source_to_detector_mm: float = 1085.6
    n_channels: int = 736
    detector_element_mm: float = 1.2858
    n_views: int = 1152

    def __post_init__(self) -> None:
        for name in ("source_to_isocenter_mm", "source_to_detector_mm", "detector_element_mm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ConfigError(f"FanBeamGeometry.{name} must be a positive length in mm, got {value!r}")
        if self.source_to_detector_mm <= self.source_to_isocenter_mm:
            raise ConfigError(
                "FanBeamGeometry.source_to_detector_mm must exceed source_to_isocenter_mm "
                f"(got {self.source_to_detector_mm} <= {self.source_to_isocenter_mm})"
            )
        if not (isinstance(self.n_channels, int) and self.n_channels >= 8):
            raise ConfigError(f"FanBeamGeometry.n_channels must be an integer >= 8, got {self.n_channels!r}")
        if not (isinstance(self.n_views, int) and self.n_views >= 8 and self.n_views % 2 == 0):
            raise ConfigError(f"FanBeamGeometry.n_views must be an even integer >= 8, got {self.n_views!r}")
        if self.fan_half_angle_rad >= math.pi / 2:
            raise ConfigError(
                f"FanBeamGeometry fan half-angle is {math.degrees(self.fan_half_angle_rad):.1f}°; "
                "it must be below 90° (fewer channels or a smaller detector_element_mm)"
            )

    @property
    def channel_step_rad(self) -> float:
        """``Δγ``, the angle between neighbouring channels seen from the focal spot (rad)."""
        return self.detector_element_mm / self.source_to_detector_mm

    @property
    def view_step_rad(self) -> float:
        """``Δβ``, the rotation between consecutive views (rad)."""
        return 2.0 * math.pi / self.n_views

    @property
    def fan_half_angle_rad(self) -> float:
        """Half the fan angle, out to the outer edge of the last channel (rad)."""
        return 0.5 * self.n_channels * self.channel_step_rad

    @property
    def fov_radius_mm(self) -> float:
        """Radius of the scan field of view: the circle every view sees completely (mm)."""
        return self.source_to_isocenter_mm * math.sin(self.fan_half_angle_rad)

    @property
    def parallel_spacing_mm(self) -> float:
        """Ray spacing of the rebinned parallel-beam data: the central channel pitch at the isocentre (mm)."""
        return self.source_to_isocenter_mm * self.channel_step_rad

    @property
    def n_parallel_rays(self) -> int:
        """Rays per rebinned parallel view (odd, so the ray grid is symmetric about the isocentre)."""
        gamma_max = 0.5 * (self.n_channels - 1) * self.channel_step_rad
        half = math.floor(self.source_to_isocenter_mm * math.sin(gamma_max) / self.parallel_spacing_mm)
        return 2 * half + 1

    def channel_angles(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``γ_j`` for every channel, shape ``(n_channels,)``, rad (float64)."""
        j = torch.arange(self.n_channels, dtype=torch.float64, device=device)
        return (j - 0.5 * (self.n_channels - 1)) * self.channel_step_rad

    def view_angles(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """``β_i`` of every view, shape ``(n_views,)``, rad (float64)."""
        return torch.arange(self.n_views, dtype=torch.float64, device=device) * self.view_step_rad

    def parallel_angles(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Angles ``θ_k`` of the rebinned parallel views over [0, π), shape ``(n_views // 2,)``, rad."""
        return torch.arange(self.n_views // 2, dtype=torch.float64, device=device) * self.view_step_rad

    def parallel_positions(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """Signed ray positions ``s`` of the rebinned parallel views, shape ``(n_parallel_rays,)``, mm."""
        k = torch.arange(self.n_parallel_rays, dtype=torch.float64, device=device)
        return (k - 0.5 * (self.n_parallel_rays - 1)) * self.parallel_spacing_mm

    def downsampled(self, view_factor: int = 1, channel_factor: int = 1) -> FanBeamGeometry:
        """The same fan sampled by every ``view_factor``-th view and ``channel_factor``-wide channels.

        Used to compute the clean projection cheaply where only a smooth quantity (the noise
        variance) depends on it. Coarse channel ``k`` is centred on the mean angle of fine channels
        ``k*f ... k*f+f-1``, so the two grids share the same fan.
        """
        if self.n_views % (2 * view_factor) or self.n_channels % channel_factor:
            raise ConfigError(
                f"cannot downsample {self.n_views} views by {view_factor} and {self.n_channels} channels by "
                f"{channel_factor}: the counts must divide evenly (and leave an even number of views)"
            )
        return FanBeamGeometry(
            source_to_isocenter_mm=self.source_to_isocenter_mm,
            source_to_detector_mm=self.source_to_detector_mm,
            n_channels=self.n_channels // channel_factor,
            detector_element_mm=self.detector_element_mm * channel_factor,
            n_views=self.n_views // view_factor,
        )
