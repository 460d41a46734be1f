"""Lower-dose CT scans simulated from normal-dose images: project, add count noise, reconstruct."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError, NonFiniteVoxelsError
from langmamba.runtime import resolve_device
from langmamba.simulate._tensor import per_slice, spacing_pairs
from langmamba.simulate.exposure import BowtieFilter, TubeCurrentModulation, water_equivalent_diameter
from langmamba.simulate.fbp import fbp_parallel
from langmamba.simulate.geometry import FanBeamGeometry
from langmamba.simulate.noise import Generators, LowSignalFilter, check_noise_args, projection_noise
from langmamba.simulate.projector import fan_beam_project
from langmamba.simulate.protocol import ELECTRONIC_NOISE, MU_WATER_PER_MM, ScanProtocol
from langmamba.simulate.rebin import rebin_fan_to_parallel

if TYPE_CHECKING:  # the simulation itself needs none of langmamba.io's readers
    from langmamba.io.volume import CTVolume

logger = logging.getLogger(__name__)

# Full-dose photons per ray (per detector channel and view, unattenuated), for the slice thickness
# of the images. 2e5 makes the model's full-dose noise match a routine 5 mm chest scan (about 5 HU in
# the aorta with the default Hann filter). In the default relative mode the added noise scales as
# 1/sqrt(I0): scale I0 with the reconstructed slice thickness (e.g. ~4e4 for 1 mm slices).
FULL_DOSE_PHOTONS = 2.0e5

# The clean projection only sets the noise variance, which varies smoothly along the sinogram, so in
# noise-insertion mode it is computed on a coarser grid (every 4th view, channel pairs, 2x2-pooled
# image) and interpolated back. The noise itself is always drawn for every ray.
_COARSE_VIEWS = 4
_COARSE_CHANNELS = 2

SeedLike = int | torch.Generator | None


def hu_to_mu(hu: torch.Tensor, mu_water_per_mm: float = MU_WATER_PER_MM) -> torch.Tensor:
    """HU → linear attenuation in 1/mm: ``μ_w (1 + HU / 1000)``, HU clipped at -1000 (air)."""
    return mu_water_per_mm * (1.0 + hu.clamp_min(-1000.0) / 1000.0)


def mu_to_hu(mu: torch.Tensor, mu_water_per_mm: float = MU_WATER_PER_MM) -> torch.Tensor:
    """Linear attenuation in 1/mm → HU."""
    return 1000.0 * (mu / mu_water_per_mm - 1.0)


def derive_slice_seeds(seed: int, n: int) -> list[int]:
    """``n`` independent 63-bit seeds derived from one integer seed (numpy ``SeedSequence.spawn``)."""
    children = np.random.SeedSequence(seed).spawn(n)
    return [int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)) for child in children]


def _generators(seed: SeedLike | Sequence[SeedLike], n: int) -> Generators:
    """One generator for the batch (or ``None``: torch's default), or a list of ``n``, one per slice."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed  # the whole batch draws from it, one call
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ConfigError(f"seed holds {len(seed)} seeds for {n} slices")
        gens = [_generators(s, 1) for s in seed]
        return [g[0] if isinstance(g, list) else _fresh_generator(g) for g in gens]
    if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int, a torch.Generator, a list of them, or None; got {seed!r}")
    seeds = [int(seed)] if n == 1 else derive_slice_seeds(int(seed), n)
    # CPU generators: the same seed gives the same noise on every device.
    return [torch.Generator().manual_seed(s) for s in seeds]


def _fresh_generator(generator: torch.Generator | None) -> torch.Generator:
    """A list entry of ``None`` gets a CPU generator seeded from fresh entropy."""
    if generator is not None:
        return generator
    seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    return torch.Generator().manual_seed(seed)


def _check_fov(shape: tuple[int, int], spacing: tuple[float, float], geometry: FanBeamGeometry) -> None:
    height, width = shape
    dy, dx = spacing
    fov = 2.0 * geometry.fov_radius_mm
    if width * dx > fov + 1e-6 or height * dy > fov + 1e-6:
        raise ConfigError(
            f"the image ({width} x {height} pixels of {dx:.4g} x {dy:.4g} mm = "
            f"{width * dx:.1f} x {height * dy:.1f} mm) is larger than the scanner's field of view "
            f"({fov:.1f} mm across); use a FanBeamGeometry with more channels or a longer source distance"
        )


def _coarse_projection(mu: torch.Tensor, spacing: tuple[float, float], geometry: FanBeamGeometry) -> torch.Tensor:
    """Clean fan sinogram ``(N, V, C)`` from a coarse projection, bilinearly interpolated to every ray."""
    # The largest coarsening up to (4 views, 2 channels) that divides this geometry's sampling.
    view_factor = next(f for f in (_COARSE_VIEWS, 2, 1) if geometry.n_views % (2 * f) == 0)
    channel_factor = next(f for f in (_COARSE_CHANNELS, 1) if geometry.n_channels % f == 0)
    coarse_geom = geometry.downsampled(view_factor, channel_factor)
    _, height, width = mu.shape
    if height % 2 == 0 and width % 2 == 0 and height >= 64 and width >= 64:
        mu, spacing = F.avg_pool2d(mu[:, None], 2)[:, 0], (2 * spacing[0], 2 * spacing[1])
    coarse = fan_beam_project(mu, spacing, coarse_geom)  # (N, V / f, C / g)
    device = mu.device
    # Fine view i sits at coarse view i / f (periodic: pad one wrapped view each side).
    view_pos = torch.arange(geometry.n_views, dtype=torch.float64, device=device) / view_factor + 1.0
    gy = view_pos / (coarse_geom.n_views + 1) * 2.0 - 1.0
    # Fine channel j sits at coarse channel (j - (g - 1) / 2) / g (clamped at the fan edges).
    fine = torch.arange(geometry.n_channels, dtype=torch.float64, device=device)
    chan_pos = (fine - 0.5 * (channel_factor - 1)) / channel_factor
    gx = chan_pos / (coarse_geom.n_channels - 1) * 2.0 - 1.0
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1).float()[None]
    padded = torch.cat((coarse[:, -1:], coarse, coarse[:, :1]), dim=1)[None]
    return F.grid_sample(padded, grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def _simulate(
    hu: torch.Tensor,
    spacing: tuple[float, float],
    dose: torch.Tensor,
    incident_photons: torch.Tensor,
    scanner: ScanProtocol,
    generators: Generators,
) -> torch.Tensor:
    """Core on ``(N, H, W)`` float32 HU on the compute device, ``dose`` and ``incident_photons`` ``(N,)``."""
    n, height, width = hu.shape
    geometry, mu_water = scanner.geometry, scanner.mu_water_per_mm
    mu = hu_to_mu(hu, mu_water)
    if scanner.reconstruction == "full":
        clean = fan_beam_project(mu, spacing, geometry)
    else:
        clean = _coarse_projection(mu, spacing, geometry)
    noisy = torch.isfinite(incident_photons)  # an infinite I0 means no noise for that slice
    flux = ray_flux(clean, torch.where(noisy, incident_photons, 1.0), scanner)
    noise = projection_noise(
        clean,
        dose[:, None, None],
        flux,
        scanner.electronic_noise,
        input_is_noise_free=scanner.input_is_noise_free,
        generator=generators,
        low_signal=scanner.low_signal,
    )
    noise = noise * noisy[:, None, None]
    sinogram = clean + noise if scanner.reconstruction == "full" else noise
    parallel = rebin_fan_to_parallel(sinogram, geometry)
    image = fbp_parallel(
        parallel,
        geometry.parallel_angles(hu.device),
        geometry.parallel_spacing_mm,
        (height, width),
        spacing,
        window=scanner.window,
        cutoff=scanner.cutoff,
    )
    if scanner.reconstruction == "full":
        out = mu_to_hu(image, mu_water)
    else:
        out = hu + (1000.0 / mu_water) * image
    # Outside the scan field of view nothing is measured: keep the input there.
    dy, dx = spacing
    y = (torch.arange(height, device=hu.device, dtype=torch.float32) - 0.5 * (height - 1)) * dy
    x = (torch.arange(width, device=hu.device, dtype=torch.float32) - 0.5 * (width - 1)) * dx
    inside = (y[:, None] ** 2 + x[None, :] ** 2) <= geometry.fov_radius_mm**2
    return torch.where(inside, out, hu)


def ray_flux(clean: torch.Tensor, incident_photons: torch.Tensor, scanner: ScanProtocol) -> torch.Tensor:
    """Full-dose photons in air of every ray, ``(N, V, C)``: ``I0 · m(β) · b(γ)`` (see :mod:`.exposure`).

    ``clean`` is the clean fan sinogram ``(N, V, C)`` (it drives the angular tube-current modulation),
    ``incident_photons`` the ``(N,)`` photons of the central ray at the slice's mean tube current.
    """
    flux = incident_photons.float()[:, None, None].expand(clean.shape)
    if scanner.modulation is not None:
        flux = flux * scanner.modulation.angular(clean)[:, :, None]
    if scanner.bowtie is not None:
        flux = flux * scanner.bowtie.transmission(scanner.geometry, scanner.mu_water_per_mm, clean.device)
    return flux


def _make_scanner(protocol: ScanProtocol | None, **settings: object) -> ScanProtocol:
    """``protocol``, or the protocol of single settings; both at once is an error naming the settings."""
    if protocol is None:
        return ScanProtocol(**{k: v for k, v in settings.items() if not (k == "geometry" and v is None)})
    if not isinstance(protocol, ScanProtocol):
        raise ConfigError(f"protocol must be a ScanProtocol, got {type(protocol).__name__}")
    default = ScanProtocol()
    given = [k for k, v in settings.items() if v != (None if k == "geometry" else getattr(default, k))]
    if given:
        raise ConfigError(f"give the scan settings either as protocol or one by one, not both ({', '.join(given)})")
    return protocol


def simulate_batch(
    hu: np.ndarray | torch.Tensor,
    pixel_spacing_mm: float | Sequence[float] | torch.Tensor,
    dose: float | Sequence[float] | torch.Tensor = 0.25,
    *,
    geometry: FanBeamGeometry | None = None,
    incident_photons: float | Sequence[float] | torch.Tensor = FULL_DOSE_PHOTONS,
    electronic_noise: float = ELECTRONIC_NOISE,
    input_is_noise_free: bool = False,
    reconstruction: str = "noise_insertion",
    window: str = "hann",
    cutoff: float = 1.0,
    mu_water_per_mm: float = MU_WATER_PER_MM,
    bowtie: BowtieFilter | None = BowtieFilter(),
    modulation: TubeCurrentModulation | None = TubeCurrentModulation(),
    low_signal: LowSignalFilter | None = LowSignalFilter(),
    seed: SeedLike | Sequence[SeedLike] = None,
    device: torch.device | str = "auto",
    protocol: ScanProtocol | None = None,
) -> np.ndarray | torch.Tensor:
    """Simulate a lower-dose scan of each slice of a ``(N, H, W)`` stack; see :func:`simulate_slice`.

    Slices are processed together (they share every sampling grid, which is faster than one by one)
    and each may have its own dose and incident photons. A tensor stays a tensor: with
    ``device="auto"`` it is simulated on its own device and returned there, so a training loop on the
    GPU never copies to the host.

    Args:
        hu: ``(N, H, W)`` HU, numpy array or torch tensor.
        pixel_spacing_mm: a number or ``(row, column)`` pair in mm shared by all slices, or a tensor
            ``(N,)`` (square pixels) or ``(N, 2)`` of per-slice spacings (slices that share a spacing
            are simulated together).
        dose: a fraction in (0, 1], or ``N`` of them (``(N,)`` tensor or sequence).
        incident_photons: ``I0`` of the central ray, a number or ``N`` of them (e.g. from
            :func:`~langmamba.simulate.calibration.native_incident_photons`).
        bowtie, modulation, low_signal: the scanner's bowtie filter, angular tube-current modulation
            and low-signal correction (:mod:`~langmamba.simulate.exposure`,
            :class:`~langmamba.simulate.noise.LowSignalFilter`); ``None`` turns one off.
        seed: an int (per-slice seeds are derived from it with :func:`derive_slice_seeds`), a list of
            ``N`` ints or generators (slice ``i`` draws from generator ``i``), one
            :class:`torch.Generator` the whole batch draws from (put it on the compute device for
            speed), or ``None`` (torch's default generator of the compute device).
        Other arguments: see :func:`simulate_slice`.

    Returns:
        ``(N, H, W)`` float32 HU: a tensor on the compute device for a tensor input, else a numpy array.
    """
    scanner = _make_scanner(
        protocol,
        geometry=geometry,
        electronic_noise=electronic_noise,
        input_is_noise_free=input_is_noise_free,
        reconstruction=reconstruction,
        window=window,
        cutoff=cutoff,
        mu_water_per_mm=mu_water_per_mm,
        bowtie=bowtie,
        modulation=modulation,
        low_signal=low_signal,
    )
    as_tensor = isinstance(hu, torch.Tensor)
    if as_tensor and (device is None or device == "auto"):
        target = hu.device
    else:
        target = resolve_device(device)
    # float32 numpy first: also accepts integer and big-endian arrays (as some NRRD files hold).
    images = hu if as_tensor else torch.tensor(np.asarray(hu, dtype=np.float32))
    if images.ndim != 3 or min(images.shape[1:]) < 2:
        raise ConfigError(f"hu must be a stack of slices (N, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    doses = per_slice(dose, n, "dose")
    photons = per_slice(incident_photons, n, "incident_photons")
    check_noise_args(doses, photons, scanner.electronic_noise)
    spacings = spacing_pairs(pixel_spacing_mm, n)
    images = images.to(device=target, dtype=torch.float32)
    if not torch.isfinite(images).all():
        raise NonFiniteVoxelsError("the image contains NaN or infinite HU values; they cannot be projected")
    for spacing in set(spacings):
        _check_fov(tuple(images.shape[1:]), spacing, scanner.geometry)
    generators = _generators(seed, n)
    doses, photons = doses.to(target, torch.float32), photons.to(target, torch.float32)
    with torch.no_grad():
        if len(set(spacings)) == 1:
            out = _simulate(images, spacings[0], doses, photons, scanner, generators)
        else:
            out = torch.empty_like(images)
            for spacing in dict.fromkeys(spacings):
                index = [i for i, s in enumerate(spacings) if s == spacing]
                group = generators if not isinstance(generators, list) else [generators[i] for i in index]
                sel = torch.tensor(index, device=target)
                out[sel] = _simulate(images[sel], spacing, doses[sel], photons[sel], scanner, group)
    return out if as_tensor else out.cpu().numpy().astype(np.float32, copy=False)


def simulate_slice(
    hu: np.ndarray | torch.Tensor,
    pixel_spacing_mm: float | Sequence[float],
    dose: float = 0.25,
    *,
    geometry: FanBeamGeometry | None = None,
    incident_photons: float = FULL_DOSE_PHOTONS,
    electronic_noise: float = ELECTRONIC_NOISE,
    input_is_noise_free: bool = False,
    reconstruction: str = "noise_insertion",
    window: str = "hann",
    cutoff: float = 1.0,
    mu_water_per_mm: float = MU_WATER_PER_MM,
    bowtie: BowtieFilter | None = BowtieFilter(),
    modulation: TubeCurrentModulation | None = TubeCurrentModulation(),
    low_signal: LowSignalFilter | None = LowSignalFilter(),
    seed: SeedLike = None,
    device: torch.device | str = "auto",
    protocol: ScanProtocol | None = None,
) -> np.ndarray | torch.Tensor:
    """Simulate a scan of one axial slice at a fraction of its dose.

    The slice (HU, centred on the isocentre) is converted to attenuation
    ``μ = μ_w (1 + HU / 1000)`` (HU clipped at -1000), projected along every ray of ``geometry``
    (fan beam, :func:`~langmamba.simulate.projector.fan_beam_project`), given count-domain noise
    (:mod:`langmamba.simulate.noise`) with the photons a clinical scanner sends along each ray (bowtie
    filter, tube current following the patient's attenuation) and its low-signal correction, rebinned
    to parallel beam and reconstructed by filtered back-projection.

    Args:
        hu: ``(H, W)`` slice in HU. Rows run along ``y``, columns along ``x``.
        pixel_spacing_mm: a number, or ``(row, column)`` spacing in mm (DICOM PixelSpacing order).
        dose: fraction of the input's dose to simulate, in (0, 1] (0.25 = quarter dose).
        geometry: scanner geometry (default :class:`FanBeamGeometry`); its field of view must
            cover the image's width and height.
        incident_photons: ``I0``, full-dose photons of the central ray in air at the slice's mean tube
            current; ``math.inf`` gives a noise-free scan (with ``reconstruction="full"``: the pure
            project→FBP round trip). To make ``dose`` mean "the input's noise variance / dose", take it
            from :func:`~langmamba.simulate.calibration.native_incident_photons`.
        electronic_noise: detector electronic noise, standard deviation in counts.
        input_is_noise_free: ``False`` (default): the input is a real full-dose scan and only the
            variance it lacks is added, ``a (1 - a) I + (1 - a²) σ_e²`` counts² per ray with
            ``I = I0 exp(-p)`` (Yu et al. 2012); ``True``: the input is an ideal object and the full
            Poisson + electronic noise at ``dose · I0`` is applied.
        reconstruction: ``"noise_insertion"`` (default): input + FBP(noise), which keeps the input's
            own resolution and needs the clean projection only for the noise level;
            ``"full"``: FBP of the noisy sinogram (the honest round trip, blurred by the FBP).
        window, cutoff: apodisation of the ramp filter (``ram-lak``, ``shepp-logan``, ``cosine``,
            ``hamming``, ``hann``) and its cut-off as a fraction of Nyquist.
        mu_water_per_mm: attenuation of water in 1/mm (sets the noise level through ``exp(-p)``).
        bowtie: :class:`~langmamba.simulate.exposure.BowtieFilter`, or ``None`` for a flat beam.
        modulation: :class:`~langmamba.simulate.exposure.TubeCurrentModulation` (its angular part is
            used here), or ``None`` for a constant tube current.
        low_signal: :class:`~langmamba.simulate.noise.LowSignalFilter` for photon-starved rays, or
            ``None`` for the raw count model.
        seed: int or :class:`torch.Generator`; the same seed gives the same output.
        device: ``"auto"`` (a tensor's own device; CUDA when available for an array), ``"cpu"``, ``"cuda"``.
        protocol: all of ``geometry`` ... ``low_signal`` as one
            :class:`~langmamba.simulate.protocol.ScanProtocol` (then leave those at their defaults).

    Returns:
        float32 ``(H, W)`` HU (a tensor for a tensor input). Pixels outside the scan field of view keep
        their input value.
    """
    array = hu if isinstance(hu, torch.Tensor) else np.asarray(hu)
    if array.ndim != 2:
        raise ConfigError(f"hu must be one slice (H, W), got shape {tuple(array.shape)}; use simulate_batch for stacks")
    return simulate_batch(
        array[None],
        pixel_spacing_mm,
        dose,
        geometry=geometry,
        incident_photons=incident_photons,
        electronic_noise=electronic_noise,
        input_is_noise_free=input_is_noise_free,
        reconstruction=reconstruction,
        window=window,
        cutoff=cutoff,
        mu_water_per_mm=mu_water_per_mm,
        bowtie=bowtie,
        modulation=modulation,
        low_signal=low_signal,
        seed=[seed] if not isinstance(seed, torch.Generator) else seed,
        device=device,
        protocol=protocol,
    )[0]


def z_modulation(
    volume: CTVolume, modulation: TubeCurrentModulation | None, mu_water_per_mm: float = MU_WATER_PER_MM
) -> np.ndarray:
    """Relative tube current of each slice, ``(Z,)`` float64 with mean 1, from its water-equivalent diameter."""
    n_slices = volume.hu.shape[0]
    if modulation is None or n_slices == 1:
        return np.ones(n_slices)
    pixel_area = float(volume.spacing[0] * volume.spacing[1])
    diameters = torch.cat(
        [
            water_equivalent_diameter(torch.from_numpy(np.asarray(volume.hu[z : z + 16], dtype=np.float32)), pixel_area)
            for z in range(0, n_slices, 16)
        ]
    )
    return modulation.longitudinal(diameters, mu_water_per_mm).double().numpy()
