"""Lower-dose CT scans simulated from normal-dose images: project, add count noise, reconstruct."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from langmamba.errors import ConfigError, NonFiniteVoxelsError
from langmamba.simulate._tensor import resolve_device, spacing_pair
from langmamba.simulate.fbp import WINDOWS, fbp_parallel
from langmamba.simulate.geometry import FanBeamGeometry
from langmamba.simulate.noise import check_noise_args, projection_noise
from langmamba.simulate.projector import fan_beam_project
from langmamba.simulate.rebin import rebin_fan_to_parallel

if TYPE_CHECKING:  # the simulation itself needs none of langmamba.io's readers
    from langmamba.io.volume import CTVolume

logger = logging.getLogger(__name__)

# Linear attenuation of water at the effective energy of a clinical 120 kVp beam, about 70 keV
# (NIST XCOM mass attenuation of water: 0.206 cm²/g at 60 keV, 0.184 at 80 keV), in 1/mm.
MU_WATER_PER_MM = 0.0192
# Full-dose photons per ray (per detector channel and view, unattenuated), for the slice thickness
# of the images. 2e5 makes the model's full-dose noise match a routine 5 mm chest scan (about 5 HU in
# the aorta with the default Hann filter). In the default relative mode the added noise scales as
# 1/sqrt(I0): scale I0 with the reconstructed slice thickness (e.g. ~4e4 for 1 mm slices).
FULL_DOSE_PHOTONS = 2.0e5
# Electronic noise of the detector channel, standard deviation in counts.
ELECTRONIC_NOISE = 10.0
RECONSTRUCTIONS = ("noise_insertion", "full")

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


def _generators(seed: SeedLike | Sequence[SeedLike], n: int) -> list[torch.Generator]:
    if isinstance(seed, torch.Generator):
        return [seed] * n  # slices draw one after another from the caller's generator
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise ConfigError(f"seed holds {len(seed)} seeds for {n} slices")
        return [g for s in seed for g in _generators(s, 1)]
    if seed is None:
        seed = int(np.random.SeedSequence().generate_state(1, np.uint64)[0] >> np.uint64(1))
    if isinstance(seed, (bool, float)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int, a torch.Generator, a list of them, or None; got {seed!r}")
    seeds = [int(seed)] if n == 1 else derive_slice_seeds(int(seed), n)
    # CPU generators: the same seed gives the same noise on every device.
    return [torch.Generator().manual_seed(s) for s in seeds]


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


def _coarse_projection(
    mu: torch.Tensor, spacing: tuple[float, float], geometry: FanBeamGeometry
) -> torch.Tensor:
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
    dose: float,
    geometry: FanBeamGeometry,
    incident_photons: float,
    electronic_noise: float,
    input_is_noise_free: bool,
    reconstruction: str,
    window: str,
    cutoff: float,
    mu_water_per_mm: float,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Core on ``(N, H, W)`` float32 HU already on the compute device; returns ``(N, H, W)`` HU."""
    n, height, width = hu.shape
    mu = hu_to_mu(hu, mu_water_per_mm)
    if reconstruction == "full":
        clean = fan_beam_project(mu, spacing, geometry)
    else:
        clean = _coarse_projection(mu, spacing, geometry)
    noise = torch.stack(
        [
            projection_noise(
                clean[i],
                dose,
                incident_photons,
                electronic_noise,
                input_is_noise_free=input_is_noise_free,
                generator=generators[i],
            )
            for i in range(n)
        ]
    )
    sinogram = clean + noise if reconstruction == "full" else noise
    parallel = rebin_fan_to_parallel(sinogram, geometry)
    image = fbp_parallel(
        parallel,
        geometry.parallel_angles(hu.device),
        geometry.parallel_spacing_mm,
        (height, width),
        spacing,
        window=window,
        cutoff=cutoff,
    )
    if reconstruction == "full":
        out = mu_to_hu(image, mu_water_per_mm)
    else:
        out = hu + (1000.0 / mu_water_per_mm) * image
    # Outside the scan field of view nothing is measured: keep the input there.
    dy, dx = spacing
    y = (torch.arange(height, device=hu.device, dtype=torch.float32) - 0.5 * (height - 1)) * dy
    x = (torch.arange(width, device=hu.device, dtype=torch.float32) - 0.5 * (width - 1)) * dx
    inside = (y[:, None] ** 2 + x[None, :] ** 2) <= geometry.fov_radius_mm**2
    return torch.where(inside, out, hu)


def simulate_batch(
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
    seed: SeedLike | Sequence[SeedLike] = None,
    device: torch.device | str = "auto",
) -> np.ndarray:
    """Simulate a lower-dose scan of each slice of a ``(N, H, W)`` stack; see :func:`simulate_slice`.

    Slices are processed together (they share every sampling grid, which is faster than one by
    one). ``seed``: an int (per-slice seeds are derived from it with :func:`derive_slice_seeds`),
    a list of ``N`` ints or generators, one :class:`torch.Generator` drawn from slice after slice,
    or ``None`` (fresh entropy).

    Returns:
        float32 ``(N, H, W)`` HU.
    """
    geometry = geometry or FanBeamGeometry()
    if not isinstance(geometry, FanBeamGeometry):
        raise ConfigError(f"geometry must be a FanBeamGeometry, got {type(geometry).__name__}")
    check_noise_args(dose, incident_photons, electronic_noise)
    if reconstruction not in RECONSTRUCTIONS:
        raise ConfigError(
            f"reconstruction must be one of {', '.join(RECONSTRUCTIONS)}; got {reconstruction!r}"
        )
    if window not in WINDOWS:
        raise ConfigError(f"window must be one of {', '.join(WINDOWS)}; got {window!r}")
    if not (isinstance(mu_water_per_mm, (int, float)) and 0 < mu_water_per_mm < 1):
        raise ConfigError(
            f"mu_water_per_mm must be in (0, 1) 1/mm (about 0.019 at 70 keV), got {mu_water_per_mm!r}"
        )
    spacing = spacing_pair(pixel_spacing_mm)
    target = resolve_device(device)
    # float32 numpy first: also accepts integer and big-endian arrays (as some NRRD files hold).
    images = hu if isinstance(hu, torch.Tensor) else torch.tensor(np.asarray(hu, dtype=np.float32))
    if images.ndim != 3 or min(images.shape[1:]) < 2:
        raise ConfigError(f"hu must be a stack of slices (N, H, W), got shape {tuple(images.shape)}")
    images = images.to(device=target, dtype=torch.float32)
    if not torch.isfinite(images).all():
        raise NonFiniteVoxelsError("the image contains NaN or infinite HU values; they cannot be projected")
    _check_fov(tuple(images.shape[1:]), spacing, geometry)
    generators = _generators(seed, images.shape[0])
    with torch.no_grad():
        out = _simulate(
            images,
            spacing,
            float(dose),
            geometry,
            float(incident_photons),
            float(electronic_noise),
            bool(input_is_noise_free),
            reconstruction,
            window,
            float(cutoff),
            float(mu_water_per_mm),
            generators,
        )
    return out.cpu().numpy().astype(np.float32, copy=False)


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
    seed: SeedLike = None,
    device: torch.device | str = "auto",
) -> np.ndarray:
    """Simulate a scan of one axial slice at a fraction of its dose.

    The slice (HU, centred on the isocentre) is converted to attenuation
    ``μ = μ_w (1 + HU / 1000)`` (HU clipped at -1000), projected along every ray of ``geometry``
    (fan beam, :func:`~langmamba.simulate.projector.fan_beam_project`), given count-domain noise
    (:mod:`langmamba.simulate.noise`), rebinned to parallel beam and reconstructed by filtered
    back-projection.

    Args:
        hu: ``(H, W)`` slice in HU. Rows run along ``y``, columns along ``x``.
        pixel_spacing_mm: a number, or ``(row, column)`` spacing in mm (DICOM PixelSpacing order).
        dose: fraction of the input's dose to simulate, in (0, 1] (0.25 = quarter dose).
        geometry: scanner geometry (default :class:`FanBeamGeometry`); its field of view must
            cover the image's width and height.
        incident_photons: ``I0``, full-dose photons per ray in air; ``math.inf`` gives a noise-free
            scan (with ``reconstruction="full"``: the pure project→FBP round trip).
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
        seed: int or :class:`torch.Generator`; the same seed gives the same output.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ...

    Returns:
        float32 ``(H, W)`` HU. Pixels outside the scan field of view keep their input value.
    """
    array = hu if isinstance(hu, torch.Tensor) else np.asarray(hu)
    if array.ndim != 2:
        raise ConfigError(
            f"hu must be one slice (H, W), got shape {tuple(array.shape)}; use simulate_batch for stacks"
        )
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
        seed=[seed] if not isinstance(seed, torch.Generator) else seed,
        device=device,
    )[0]


def simulate_volume(
    volume: CTVolume,
    dose: float = 0.25,
    *,
    seed: int = 0,
    progress: bool = False,
    batch_size: int = 4,
    **kwargs,
) -> CTVolume:
    """Simulate a lower-dose scan of every axial slice of ``volume``.

    Slice ``z`` uses the seed ``derive_slice_seeds(seed, Z)[z]`` whatever the batch size, so results
    do not depend on ``batch_size``. The in-plane spacing may differ between rows and columns.

    Args:
        volume: the normal-dose volume (``hu`` is ``(Z, Y, X)``, ``spacing`` is ``(x, y, z)`` mm).
        dose: fraction of the dose, in (0, 1].
        seed: integer seed.
        progress: show a tqdm progress bar over slices.
        batch_size: slices simulated together (memory grows linearly with it).
        **kwargs: any keyword of :func:`simulate_slice` (geometry, incident_photons,
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
    seeds = derive_slice_seeds(int(seed), n_slices)
    out = np.empty_like(volume.hu, dtype=np.float32)
    starts = range(0, n_slices, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="simulating low dose", unit="batch")
    for start in starts:
        stop = min(start + batch_size, n_slices)
        out[start:stop] = simulate_batch(
            volume.hu[start:stop], spacing, dose, seed=list(seeds[start:stop]), **kwargs
        )
        logger.debug("simulated slices %d-%d of %d", start, stop - 1, n_slices)
    return volume.with_hu(out)
