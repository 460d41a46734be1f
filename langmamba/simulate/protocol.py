"""The scan protocol of a simulated lower-dose scan: scanner, beam shaping, noise model and reconstruction.

:class:`ScanProtocol` gathers every simulation setting that is the same for all slices (the dose, the
incident photons and the random seed are per slice and stay arguments of the simulate functions). Its
defaults are those of :func:`~langmamba.simulate.simulate_slice`; ``to_dict``/``from_dict`` give the
``dataclasses.asdict`` form for configs and result files.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from langmamba.errors import ConfigError
from langmamba.simulate.exposure import BowtieFilter, TubeCurrentModulation
from langmamba.simulate.fbp import WINDOWS
from langmamba.simulate.geometry import FanBeamGeometry
from langmamba.simulate.noise import LowSignalFilter

# Linear attenuation of water at the effective energy of a clinical 120 kVp beam, about 70 keV
# (NIST XCOM mass attenuation of water: 0.206 cm²/g at 60 keV, 0.184 at 80 keV), in 1/mm.
MU_WATER_PER_MM = 0.0192
# Electronic noise of the detector channel, standard deviation in counts.
ELECTRONIC_NOISE = 10.0
RECONSTRUCTIONS = ("noise_insertion", "full")

_PARTS: dict[str, type] = {
    "geometry": FanBeamGeometry,
    "bowtie": BowtieFilter,
    "modulation": TubeCurrentModulation,
    "low_signal": LowSignalFilter,
}


@dataclass(frozen=True)
class ScanProtocol:
    """Every setting of a simulated scan that is not per slice; see :func:`~langmamba.simulate.simulate_slice`.

    Attributes:
        geometry: the fan-beam scanner; its field of view must cover the image.
        electronic_noise: detector electronic noise, standard deviation in counts.
        input_is_noise_free: ``False``: the input is a real full-dose scan and only the variance it lacks
            is added; ``True``: the input is an ideal object and the full noise is applied.
        reconstruction: ``"noise_insertion"`` (input + FBP(noise)) or ``"full"`` (FBP of the noisy sinogram).
        window: apodisation of the ramp filter (one of ``fbp.WINDOWS``).
        cutoff: the window's cut-off as a fraction of Nyquist.
        mu_water_per_mm: attenuation of water in 1/mm (about 0.019 at 70 keV).
        bowtie: the beam's bowtie filter, or ``None`` for a flat beam.
        modulation: tube-current modulation (its angular part is used per slice), or ``None``.
        low_signal: low-signal correction of photon-starved rays, or ``None`` for the raw count model.
    """

    geometry: FanBeamGeometry = field(default_factory=FanBeamGeometry)
    electronic_noise: float = ELECTRONIC_NOISE
    input_is_noise_free: bool = False
    reconstruction: str = "noise_insertion"
    window: str = "hann"
    cutoff: float = 1.0
    mu_water_per_mm: float = MU_WATER_PER_MM
    bowtie: BowtieFilter | None = field(default_factory=BowtieFilter)
    modulation: TubeCurrentModulation | None = field(default_factory=TubeCurrentModulation)
    low_signal: LowSignalFilter | None = field(default_factory=LowSignalFilter)

    def __post_init__(self) -> None:
        for name, kind in _PARTS.items():
            value = getattr(self, name)
            if value is None and name != "geometry":
                continue
            if not isinstance(value, kind):
                allowed = kind.__name__ if name == "geometry" else f"{kind.__name__} or None"
                raise ConfigError(f"{name} must be a {allowed}, got {type(value).__name__}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ConfigError(
                f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}; got {self.reconstruction!r}"
            )
        if self.window not in WINDOWS:
            raise ConfigError(f"window must be one of {', '.join(WINDOWS)}; got {self.window!r}")
        mu = self.mu_water_per_mm
        if not (isinstance(mu, (int, float)) and not isinstance(mu, bool) and 0 < mu < 1):
            raise ConfigError(f"mu_water_per_mm must be in (0, 1) 1/mm (about 0.019 at 70 keV), got {mu!r}")

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict``: plain numbers, strings and nested dicts (``None`` for a part turned off)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ScanProtocol:
        """The protocol from :meth:`to_dict`'s form; a missing key keeps its default, an unknown one raises."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"ScanProtocol: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        kwargs = dict(values)
        for name, kind in _PARTS.items():
            part = kwargs.get(name)
            if isinstance(part, Mapping):
                try:
                    kwargs[name] = kind(**part)
                except TypeError as error:
                    raise ConfigError(f"ScanProtocol.{name}: {error}") from None
        return cls(**kwargs)
