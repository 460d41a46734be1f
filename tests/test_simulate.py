"""Tests of langmamba.simulate: projector, FBP, noise physics, seeding and argument checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from langmamba.bench.noise import phantom_run, wide_body_phantom
from langmamba.errors import ConfigError
from langmamba.io.volume import CTVolume
from langmamba.simulate import (
    BowtieFilter,
    FanBeamGeometry,
    LowSignalFilter,
    ScanProtocol,
    TubeCurrentModulation,
    added_count_variance,
    calibrate_volume,
    derive_slice_seeds,
    estimate_noise,
    fan_beam_project,
    fbp_parallel,
    native_incident_photons,
    projection_noise,
    rebin_fan_to_parallel,
    simulate_batch,
    simulate_slice,
    simulate_volume,
    z_modulation,
)
from langmamba.simulate.calibration import flat_soft_tissue, window_pixels
from langmamba.simulate.nps import compare_nps, noise_power_spectrum, roi_corners

# Same fan and field of view as the default scanner, sampled half as finely: keeps the physics, 8x faster.
SMALL = FanBeamGeometry(n_channels=368, detector_element_mm=2 * 1.2858, n_views=576)
PIXEL_MM = 2.0
SIZE = 128


def _grid(size: int | tuple[int, int], spacing: float | tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(y, x)`` in mm, isocentre at the image centre."""
    h, w = (size, size) if isinstance(size, int) else size
    dy, dx = (spacing, spacing) if isinstance(spacing, (int, float)) else spacing
    y = (np.arange(h) - 0.5 * (h - 1)) * dy
    x = (np.arange(w) - 0.5 * (w - 1)) * dx
    return np.meshgrid(y, x, indexing="ij")


def _water_cylinder(size: int = SIZE, spacing: float = PIXEL_MM, radius: float = 90.0) -> np.ndarray:
    """Water disc in air with a bone insert and a lung insert (HU)."""
    y, x = _grid(size, spacing)
    hu = np.full(x.shape, -1000.0, dtype=np.float32)
    hu[np.hypot(x, y) <= radius] = 0.0
    hu[np.hypot(x - 45.0, y + 20.0) <= 15.0] = 700.0
    hu[np.hypot(x + 45.0, y - 10.0) <= 15.0] = -700.0
    return hu


def _centre_roi(size: int = SIZE, spacing: float = PIXEL_MM, radius: float = 25.0) -> np.ndarray:
    y, x = _grid(size, spacing)
    return np.hypot(x, y + 35.0) <= radius  # uniform water below the inserts


# ---------------------------------------------------------------- geometry and exact pieces


def test_default_geometry_is_clinical_fan():
    g = FanBeamGeometry()
    assert g.n_views == 1152 and g.n_channels == 736
    assert g.channel_step_rad == pytest.approx(1.2858 / 1085.6)
    assert 2 * g.fov_radius_mm == pytest.approx(502.5, abs=1.0)  # the 50 cm scan field of view
    assert g.parallel_positions().abs().max() <= g.fov_radius_mm
    assert g.parallel_angles().numel() == 576


@pytest.mark.parametrize(
    "kwargs",
    [
        {"n_views": 1151},
        {"source_to_detector_mm": 500.0},
        {"n_channels": 0},
        {"detector_element_mm": -1.0},
        {"n_channels": 5000},
    ],
)
def test_bad_geometry_raises(kwargs):
    with pytest.raises(ConfigError):
        FanBeamGeometry(**kwargs)


def test_projector_matches_analytic_chords():
    """An off-centre disc: every ray's line integral equals mu times its chord length."""
    mu, cx, cy, radius = 0.02, 30.0, -20.0, 70.0
    size, spacing, oversample = 160, 1.5, 4
    fine_y, fine_x = _grid(size * oversample, spacing / oversample)
    fine = ((fine_x - cx) ** 2 + (fine_y - cy) ** 2 <= radius**2).astype(np.float32)
    image = torch.from_numpy(fine.reshape(size, oversample, size, oversample).mean(axis=(1, 3)) * mu)
    sino = fan_beam_project(image, spacing, SMALL).double()

    beta = SMALL.view_angles()[:, None]
    psi = beta + math.pi + SMALL.channel_angles()[None, :]
    src_x, src_y = SMALL.source_to_isocenter_mm * beta.cos(), SMALL.source_to_isocenter_mm * beta.sin()
    dist = ((cx - src_x) * psi.sin() - (cy - src_y) * psi.cos()).abs()
    expected = 2 * mu * (radius**2 - dist**2).clamp_min(0).sqrt()

    assert sino.shape == (SMALL.n_views, SMALL.n_channels)
    err = sino - expected
    assert err.pow(2).mean().sqrt() < 0.005 * expected.max()  # 0.5 % of the central line integral
    assert err.abs().max() < 0.15 * expected.max()  # rays grazing the edge see the pixelated boundary


def test_rebin_and_fbp_reconstruct_constant_disc():
    mu = 0.0192
    y, x = _grid(SIZE, PIXEL_MM)
    disc = torch.from_numpy(((np.hypot(x, y) <= 100.0) * mu).astype(np.float32))
    parallel = rebin_fan_to_parallel(fan_beam_project(disc, PIXEL_MM, SMALL), SMALL)
    assert parallel.shape == (SMALL.n_views // 2, SMALL.n_parallel_rays)
    image = fbp_parallel(parallel, SMALL.parallel_angles(), SMALL.parallel_spacing_mm, (SIZE, SIZE), PIXEL_MM)
    inner = np.hypot(x, y) <= 80.0
    assert image.numpy()[inner].mean() == pytest.approx(mu, rel=2e-3)
    assert np.abs(image.numpy()[np.hypot(x, y) > 115.0]).max() < 0.02 * mu


# ---------------------------------------------------------------- round trip and geometry conventions


@pytest.mark.slow
def test_noise_free_round_trip_default_geometry_512():
    """Project -> FBP with no noise on the full clinical geometry: the error left is FBP blur at edges."""
    size, spacing = 512, 360.0 / 512
    hu = _water_cylinder(size, spacing, radius=150.0)
    out = simulate_slice(
        hu, spacing, 1.0, incident_photons=math.inf, input_is_noise_free=True, reconstruction="full", seed=0
    )
    y, x = _grid(size, spacing)
    r_insert = np.minimum(np.hypot(x - 45.0, y + 20.0), np.hypot(x + 45.0, y - 10.0))
    body = np.hypot(x, y) <= 150.0
    interior = (np.hypot(x, y) <= 147.0) & (np.abs(r_insert - 15.0) >= 3.0)  # >= 3 mm from any edge
    rmse_interior = np.sqrt(np.mean((out - hu)[interior] ** 2))
    rmse_body = np.sqrt(np.mean((out - hu)[body] ** 2))
    assert rmse_interior < 2.0  # measured 0.6 HU (Hann window)
    assert rmse_body < 60.0  # measured 35 HU, nearly all of it FBP blur at the 700-1000 HU steps
    assert abs(float(np.mean((out - hu)[interior]))) < 0.5


def test_round_trip_anisotropic_non_square_image():
    """Rows and columns of different size and spacing keep their orientation through the round trip."""
    shape, spacing = (96, 130), (2.5, 1.75)  # (rows, cols), (dy, dx) mm
    y, x = _grid(shape, spacing)
    hu = np.full(shape, -1000.0, dtype=np.float32)
    hu[(x / 100.0) ** 2 + (y / 80.0) ** 2 <= 1.0] = 50.0
    hu[np.hypot(x - 50.0, y - 25.0) <= 15.0] = 400.0  # off-axis insert: a transposition would move it
    out = simulate_slice(
        hu,
        spacing,
        1.0,
        geometry=SMALL,
        incident_photons=math.inf,
        input_is_noise_free=True,
        reconstruction="full",
    )
    assert out.shape == shape and out.dtype == np.float32
    assert abs(float(out[np.hypot(x - 50.0, y - 25.0) <= 8.0].mean()) - 400.0) < 10.0
    assert abs(float(out[np.hypot(x + 50.0, y + 25.0) <= 8.0].mean()) - 50.0) < 10.0


def test_noise_insertion_without_noise_returns_input():
    hu = _water_cylinder()
    out = simulate_slice(hu, PIXEL_MM, 0.25, geometry=SMALL, incident_photons=math.inf)
    np.testing.assert_allclose(out, hu, atol=1e-3)
    # Dose 1 in the relative mode adds no variance: the full-dose input is already what it should be.
    np.testing.assert_allclose(simulate_slice(hu, PIXEL_MM, 1.0, geometry=SMALL, seed=3), hu, atol=1e-2)


# ---------------------------------------------------------------- noise physics


def test_projection_noise_matches_count_formulas():
    p = torch.full((400, 500), 4.0)
    i0, dose, sigma_e = 2e5, 0.3, 25.0  # ~1100 photons: the first-order (delta-method) variance holds
    expected = i0 * math.exp(-4.0)
    generator = torch.Generator().manual_seed(1)
    ideal = projection_noise(p, dose, i0, sigma_e, input_is_noise_free=True, generator=generator)
    var_ideal = (dose * expected + sigma_e**2) / (dose * expected) ** 2
    assert ideal.var().item() == pytest.approx(var_ideal, rel=0.03)
    relative = projection_noise(p, dose, i0, sigma_e, generator=torch.Generator().manual_seed(2))
    var_relative = added_count_variance(torch.tensor(expected), dose, sigma_e).item() / (dose * expected) ** 2
    assert relative.var().item() == pytest.approx(var_relative, rel=0.03)
    assert abs(relative.mean().item()) < 0.05 * math.sqrt(var_relative)


@pytest.mark.parametrize("reconstruction", ["noise_insertion", "full"])
def test_noise_free_input_sigma_scales_as_inverse_sqrt_dose(reconstruction):
    hu = np.stack([_water_cylinder()] * 3)
    roi = _centre_roi()
    sigmas = {}
    for dose in (1.0, 0.5, 0.25, 0.1):
        out = simulate_batch(
            hu,
            PIXEL_MM,
            dose,
            geometry=SMALL,
            electronic_noise=0.0,
            input_is_noise_free=True,
            reconstruction=reconstruction,
            seed=11,
        )
        sigmas[dose] = float(np.mean([(o - h)[roi].std() for o, h in zip(out, hu)]))
        # Mean HU preserved in the uniform region.
        assert abs(float(np.mean(out[:, roi]))) < 5.0
    for dose, sigma in sigmas.items():
        assert sigma * math.sqrt(dose) == pytest.approx(sigmas[1.0], rel=0.15), sigmas


def test_relative_mode_added_variance_scales_as_inverse_dose_minus_one():
    hu = np.stack([_water_cylinder()] * 3)
    roi = _centre_roi()
    per_unit = []
    for dose in (0.5, 0.25, 0.1):
        out = simulate_batch(hu, PIXEL_MM, dose, geometry=SMALL, electronic_noise=0.0, seed=5)
        added_var = float(np.mean([(o - h)[roi].var() for o, h in zip(out, hu)]))
        per_unit.append(added_var / (1.0 / dose - 1.0))
        assert abs(float(np.mean(out[:, roi]))) < 5.0
    assert max(per_unit) / min(per_unit) < 1.15, per_unit


def test_electronic_noise_adds_variance_at_low_dose():
    hu = _water_cylinder()
    roi = _centre_roi()
    kw = dict(geometry=SMALL, incident_photons=2e3, input_is_noise_free=True, seed=4)
    quiet = simulate_slice(hu, PIXEL_MM, 0.1, electronic_noise=0.0, **kw)
    noisy = simulate_slice(hu, PIXEL_MM, 0.1, electronic_noise=30.0, **kw)
    assert noisy[roi].std() > 1.2 * quiet[roi].std()


# ---------------------------------------------------------------- seeds, volumes, devices


def test_same_seed_same_output_and_different_seed_differs():
    hu = _water_cylinder()
    a = simulate_slice(hu, PIXEL_MM, 0.25, geometry=SMALL, seed=123)
    b = simulate_slice(hu, PIXEL_MM, 0.25, geometry=SMALL, seed=123)
    c = simulate_slice(hu, PIXEL_MM, 0.25, geometry=SMALL, seed=124)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1.0
    # Integer, big-endian input (as NRRD files may hold) gives the same result as float32.
    big_endian = simulate_slice(hu.astype(">i2"), PIXEL_MM, 0.25, geometry=SMALL, seed=123)
    np.testing.assert_array_equal(big_endian, a)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    np.testing.assert_array_equal(
        simulate_slice(torch.from_numpy(hu), PIXEL_MM, 0.25, geometry=SMALL, seed=g1, device="cpu"),
        simulate_slice(hu, PIXEL_MM, 0.25, geometry=SMALL, seed=g2, device="cpu"),
    )


def test_simulate_volume_per_slice_seeds_and_geometry():
    hu = np.stack([_water_cylinder(96, 2.5), _water_cylinder(96, 2.5) + 10.0, _water_cylinder(96, 2.5)])
    volume = CTVolume(hu=hu, spacing=(2.5, 2.5, 3.0), origin=(1.0, 2.0, 3.0), source="memory")
    out = simulate_volume(volume, 0.25, seed=7, geometry=SMALL, batch_size=2, incident_photons=2e5)
    assert isinstance(out, CTVolume)
    assert out.shape == volume.shape and out.spacing == volume.spacing and out.origin == volume.origin
    seeds = derive_slice_seeds(7, 3)
    photons = 2e5 * z_modulation(volume, TubeCurrentModulation())
    assert photons[1] > photons[0] == pytest.approx(photons[2])  # the denser slice gets more current
    for z in range(3):
        one = simulate_slice(hu[z], 2.5, 0.25, geometry=SMALL, seed=seeds[z], incident_photons=photons[z])
        np.testing.assert_allclose(out.hu[z], one, atol=1e-3)
    whole = simulate_volume(volume, 0.25, seed=7, geometry=SMALL, batch_size=3, incident_photons=2e5)
    np.testing.assert_allclose(whole.hu, out.hu, atol=1e-3)
    assert np.abs(out.hu[0] - out.hu[2]).max() > 1.0  # same content, independent noise


def test_pixels_outside_fov_keep_input_values():
    # FOV ~181 mm; odd channel and view counts that the coarse variance grid cannot halve.
    geometry = FanBeamGeometry(n_channels=129, detector_element_mm=2 * 1.2858, n_views=250)
    size, spacing = 80, 2.1  # 168 mm: fits across, corners outside the FOV circle
    hu = np.zeros((size, size), dtype=np.float32)
    out = simulate_slice(hu, spacing, 0.25, geometry=geometry, seed=1)
    y, x = _grid(size, spacing)
    outside = np.hypot(x, y) > geometry.fov_radius_mm
    assert outside.any()
    np.testing.assert_array_equal(out[outside], hu[outside])
    assert out[~outside].std() > 0


# ---------------------------------------------------------------- realistic scanner: bowtie, modulation, low signal

WIDE_MM = 500.0 / 128  # 128 pixels across the 50 cm field of view


def _wide_body(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """The issue-15 phantom: a 49 cm abdomen with spine and arms (HU), and its soft interior."""
    hu, interior, _ = wide_body_phantom(size)
    return hu, interior


def _native_scan(clean: np.ndarray, photons: float, seed: int = 2, geometry: FanBeamGeometry = SMALL) -> np.ndarray:
    """A 'real' full-dose scan of a phantom: the full noise model at dose 1 (FBP-correlated noise)."""
    return simulate_slice(
        clean, WIDE_MM, 1.0, geometry=geometry, seed=seed, input_is_noise_free=True, incident_photons=photons
    )


def test_bowtie_transmission_falls_off_to_the_edges():
    bowtie = BowtieFilter()
    t = bowtie.transmission(FanBeamGeometry(), 0.0192)
    centre = t.numel() // 2
    assert t[centre - 1 : centre + 1].min() > 0.999
    half = t[centre:]
    assert bool((half[1:] <= half[:-1] + 1e-7).all())  # monotone away from the centre
    assert float(t.min()) == pytest.approx(math.exp(-0.0192 * bowtie.max_water_mm), rel=1e-4)
    assert torch.equal(t, t.flip(0))
    with pytest.raises(ConfigError, match="max_water_mm"):
        BowtieFilter(max_water_mm=-1.0)


def test_tube_current_follows_attenuation_with_mean_one():
    hu, _ = _wide_body()
    mu = torch.from_numpy(0.0192 * (1.0 + np.maximum(hu, -1000.0) / 1000.0))
    sino = fan_beam_project(mu, WIDE_MM, SMALL)[None]
    current = TubeCurrentModulation().angular(sino)[0]
    assert current.mean().item() == pytest.approx(1.0, abs=1e-5)
    beta = SMALL.view_angles()
    # The source on the x axis (beta = 0, pi) looks through the width: more current than from above.
    lateral = current[(beta.cos().abs() > 0.95)].mean()
    frontal = current[(beta.sin().abs() > 0.95)].mean()
    assert lateral > 3.0 * frontal
    capped = TubeCurrentModulation(max_ratio=2.0).angular(sino)[0]
    assert capped.max() / capped.min() <= 2.0 + 1e-4
    assert torch.allclose(TubeCurrentModulation(angular_exponent=0.0).angular(sino), torch.ones(1, SMALL.n_views))
    z = TubeCurrentModulation().longitudinal(torch.tensor([200.0, 300.0, 400.0]), 0.0192)
    assert z.mean().item() == pytest.approx(1.0, abs=1e-6) and bool((z[1:] > z[:-1]).all())


def test_low_signal_filter_averages_only_starved_rays():
    lsf = LowSignalFilter(min_effective_counts=20.0, max_channels=33)
    counts = torch.tensor([1e5, 100.0, 10.0, 2.0, 0.01])
    half = lsf.half_widths(counts, electronic_noise=0.0)
    assert half.tolist()[:2] == [0, 0] and half[2] == 1 and half[3] == 5 and half[4] == 16
    noise = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    widths = torch.randint(0, 6, (3, 64), generator=torch.Generator().manual_seed(1))
    from langmamba.simulate.noise import _variable_box_mean

    fast = _variable_box_mean(noise, widths)
    for r in range(3):
        for j in range(64):
            lo, hi = max(0, j - int(widths[r, j])), min(64, j + int(widths[r, j]) + 1)
            assert fast[r, j].item() == pytest.approx(noise[r, lo:hi].mean().item(), abs=1e-5)


def test_wide_body_quarter_dose_adds_the_noise_the_dose_implies():
    """Issue 15: a 49 cm body with arms at quarter dose got +-1000 HU streaks (added sigma 146 HU)."""
    clean, interior = _wide_body()
    native = _native_scan(clean, 1e6)
    native_var = float((native - clean)[interior].var())
    calibration = native_incident_photons(native, WIDE_MM, 0.25, geometry=SMALL)
    out = simulate_slice(
        native, WIDE_MM, 0.25, geometry=SMALL, seed=5, incident_photons=float(calibration.incident_photons[0])
    )
    added = (out - native)[interior]
    implied = math.sqrt(native_var * (1 / 0.25 - 1))
    assert implied / 1.5 < added.std() < 1.5 * implied, (added.std(), implied)
    assert np.percentile(np.abs(added), 99.9) < 8.0 * added.std()
    assert abs(float(added.mean())) < 0.2 * implied  # no bias from the log of starved rays
    # The scanner without bowtie, modulation and low-signal correction, at the default photons, fails.
    raw = simulate_slice(native, WIDE_MM, 0.25, geometry=SMALL, seed=5, bowtie=None, modulation=None, low_signal=None)
    assert (raw - native)[interior].std() > 3.0 * implied


def test_phantom_bench_reports_native_aware_noise_within_the_dose_bound():
    result = phantom_run(0.25, size=96, device="cpu")
    runs = result["runs"]
    native_aware = next(v for k, v in runs.items() if k.startswith("native-aware photons"))
    implied = result["implied_added_sigma_hu"]
    assert implied / 1.5 < native_aware["added_sigma_hu"] < 1.5 * implied
    assert native_aware["variance_ratio"] == pytest.approx(4.0, rel=0.25)
    assert runs["native-aware, no bowtie/modulation/low-signal"]["added_sigma_hu"] > native_aware["added_sigma_hu"]


@pytest.mark.parametrize("dose", [0.5, 0.1])
@pytest.mark.slow
def test_native_noise_aware_dose_gives_variance_over_dose(dose):
    """Dose d multiplies the scan's own noise variance by 1 / d over the soft tissue it was measured in."""
    clean = _water_cylinder(128, 2.0, radius=110.0)
    native = simulate_slice(
        clean, PIXEL_MM, 1.0, geometry=SMALL, seed=8, input_is_noise_free=True, incident_photons=3e4
    )
    calibration = native_incident_photons(native, PIXEL_MM, dose, geometry=SMALL, seed=1)
    assert calibration.variance_ratio[0].item() == pytest.approx(1 / dose, rel=0.1)
    out = simulate_batch(
        np.stack([native] * 2),
        PIXEL_MM,
        dose,
        geometry=SMALL,
        seed=[21, 22],
        incident_photons=calibration.incident_photons.expand(2),
    )
    tissue = estimate_noise(native, PIXEL_MM).mask[0].numpy()
    assert tissue.sum() > 2000
    ratio = float(np.mean([(o - clean)[tissue].var() for o in out])) / float((native - clean)[tissue].var())
    assert ratio == pytest.approx(1 / dose, rel=0.15), ratio


def test_estimate_noise_finds_sigma_of_flat_tissue_and_skips_air():
    rng = np.random.default_rng(0)
    hu = _water_cylinder(128, 2.0, radius=110.0) + 40.0
    noisy = hu + rng.normal(0.0, 12.0, hu.shape).astype(np.float32)
    estimate = estimate_noise(noisy, 2.0)
    assert estimate.sigma_hu[0].item() == pytest.approx(12.0, rel=0.05)
    assert not estimate.mask[0][0, 0]  # air corner
    assert math.isnan(estimate_noise(np.full((64, 64), -1000.0, np.float32), 2.0).sigma_hu[0].item())


def test_calibrate_volume_spreads_photons_along_z():
    clean = np.stack([_water_cylinder(96, 2.5, radius=r) for r in (80.0, 100.0, 110.0)])
    rng = np.random.default_rng(1)
    noisy = clean + (clean > -900) * rng.normal(0, 10.0, clean.shape).astype(np.float32)
    volume = CTVolume(hu=noisy, spacing=(2.5, 2.5, 3.0), origin=(0.0, 0.0, 0.0), source="memory")
    calibration = calibrate_volume(volume, 0.25, n_slices=2, geometry=SMALL)
    assert calibration.slices == [0, 2] and np.isfinite(calibration.reference_photons)
    factors = z_modulation(volume, TubeCurrentModulation())
    assert factors[0] < factors[1] < factors[2]  # the wider slices get more current
    # Between calibrated slices, the measured photons / z modulation are interpolated log-linearly.
    correction = np.log(calibration.incident_photons / factors)
    assert correction[1] == pytest.approx(0.5 * (correction[0] + correction[2]), abs=1e-9)
    assert np.median(calibration.variance_ratio) == pytest.approx(4.0, rel=0.1)
    assert "variance ratio" in calibration.line()
    with pytest.raises(ConfigError, match="noise-free"):
        calibrate_volume(volume, 0.25, input_is_noise_free=True)


# ---------------------------------------------------------------- noise power spectrum


def test_nps_of_white_noise_is_flat_at_sigma_squared_times_pixel_area():
    rng = np.random.default_rng(3)
    noise = rng.normal(0.0, 10.0, (4, 128, 128))
    nps = noise_power_spectrum(noise, 0.8, roi_px=32, detrend_order=0)
    assert nps.n_rois == 4 * 16
    assert nps.variance == pytest.approx(100.0, rel=0.03)
    assert nps.frequency[-1] == pytest.approx(0.5 / 0.8, rel=0.05)
    ring = nps.nps[2:]  # the lowest rings hold a few bins only
    assert np.all(np.abs(ring / (100.0 * 0.8 * 0.8) - 1.0) < 0.15), ring / 64.0


def test_nps_roi_corners_stay_inside_the_mask():
    mask = np.zeros((100, 100), dtype=bool)
    mask[10:60, 20:90] = True
    corners = roi_corners(mask, 16)
    assert corners and all(mask[r : r + 16, c : c + 16].all() for r, c in corners)
    assert (8, 16) not in corners


def test_added_noise_nps_has_the_shape_of_native_noise():
    clean = _water_cylinder(128, 2.0, radius=110.0)
    native = simulate_slice(
        clean, PIXEL_MM, 1.0, geometry=SMALL, seed=8, input_is_noise_free=True, incident_photons=3e5
    )  # quantum noise dominates: added variance = 3x native
    low = simulate_slice(native, PIXEL_MM, 0.25, geometry=SMALL, seed=9, incident_photons=3e5)
    tissue = flat_soft_tissue(torch.from_numpy(native)[None], window_pixels(PIXEL_MM))[0].numpy()
    corners = [roi_corners(tissue, 16)]
    added = noise_power_spectrum(low - native, PIXEL_MM, corners, roi_px=16)
    own = noise_power_spectrum(native, PIXEL_MM, corners, roi_px=16)
    report = compare_nps(added, own)
    assert report["shape_correlation"] > 0.9 and report["shape_overlap"] > 0.85, report
    assert report["added"]["peak_frequency"] == pytest.approx(report["native"]["peak_frequency"], abs=0.04)
    assert report["variance_ratio"] == pytest.approx(3.0, rel=0.3)
    white = noise_power_spectrum(np.random.default_rng(0).normal(0, 10, native.shape), PIXEL_MM, corners, roi_px=16)
    assert compare_nps(white, own)["shape_overlap"] < report["shape_overlap"] - 0.1
    with pytest.raises(ConfigError, match="rings"):
        compare_nps(noise_power_spectrum(native, 1.0, corners, roi_px=16), own)


# ---------------------------------------------------------------- batched tensor API (the training's GPU path)


@pytest.mark.slow
def test_tensor_batch_stays_tensor_and_matches_per_slice_calls():
    hu = np.stack([_water_cylinder(), _water_cylinder() + 20.0, _water_cylinder()])
    doses = torch.tensor([0.5, 0.25, 0.1])
    photons = torch.tensor([1e5, 2e5, 4e5])
    out = simulate_batch(
        torch.from_numpy(hu), PIXEL_MM, doses, geometry=SMALL, incident_photons=photons, seed=[1, 2, 3]
    )
    assert isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.shape == hu.shape
    for i in range(3):
        one = simulate_slice(
            hu[i], PIXEL_MM, float(doses[i]), geometry=SMALL, seed=i + 1, incident_photons=float(photons[i])
        )
        assert isinstance(one, np.ndarray)
        np.testing.assert_allclose(out[i].numpy(), one, atol=1e-3)
    # One generator on the compute device draws the whole batch in one call.
    gen = torch.Generator().manual_seed(4)
    again = simulate_batch(torch.from_numpy(hu), PIXEL_MM, doses, geometry=SMALL, seed=gen)
    assert again.shape == hu.shape and torch.isfinite(again).all()
    # Per-slice spacings: slices that share one are simulated together, the result is the same.
    spacings = torch.tensor([PIXEL_MM, 1.8, PIXEL_MM])
    mixed = simulate_batch(
        torch.from_numpy(hu), spacings, doses, geometry=SMALL, incident_photons=photons, seed=[1, 2, 3]
    )
    np.testing.assert_allclose(mixed[0].numpy(), out[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(
        mixed[1].numpy(), simulate_slice(hu[1], 1.8, 0.25, geometry=SMALL, seed=2, incident_photons=2e5), atol=1e-3
    )
    with pytest.raises(ConfigError, match="dose"):
        simulate_batch(torch.from_numpy(hu), PIXEL_MM, torch.tensor([0.5, 0.0, 0.1]), geometry=SMALL)
    with pytest.raises(ConfigError, match="3 slices"):
        simulate_batch(torch.from_numpy(hu), PIXEL_MM, torch.tensor([0.5, 0.1]), geometry=SMALL)


# ---------------------------------------------------------------- argument checks


def test_image_larger_than_fov_raises_naming_sizes():
    with pytest.raises(ConfigError, match=r"600\.0 x 600\.0 mm.*502\.4 mm"):
        simulate_slice(np.zeros((300, 300), np.float32), 2.0, 0.25)


@pytest.mark.parametrize("dose", [0.0, -0.25, 1.5, float("nan"), float("inf")])
def test_bad_dose_raises(dose):
    with pytest.raises(ConfigError, match="dose"):
        simulate_slice(np.zeros((32, 32), np.float32), 1.0, dose, geometry=SMALL)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"reconstruction": "iterative"}, "reconstruction"),
        ({"window": "gauss"}, "window"),
        ({"incident_photons": 0.0}, "incident_photons"),
        ({"electronic_noise": -1.0}, "electronic_noise"),
        ({"seed": 1.5}, "seed"),
        ({"device": "tpu:x"}, "device"),
    ],
)
def test_bad_arguments_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        simulate_slice(np.zeros((32, 32), np.float32), 1.0, 0.25, geometry=SMALL, **kwargs)


def test_scan_protocol_gives_the_same_scan_as_single_settings_and_round_trips():
    hu = _water_cylinder()
    protocol = ScanProtocol(geometry=SMALL, window="hamming", bowtie=None, low_signal=LowSignalFilter(max_channels=9))
    single = simulate_slice(
        hu,
        PIXEL_MM,
        0.25,
        seed=5,
        geometry=SMALL,
        window="hamming",
        bowtie=None,
        low_signal=LowSignalFilter(max_channels=9),
    )
    np.testing.assert_array_equal(simulate_slice(hu, PIXEL_MM, 0.25, seed=5, protocol=protocol), single)
    stored = protocol.to_dict()
    assert stored["bowtie"] is None and stored["geometry"]["n_views"] == 576 and stored["window"] == "hamming"
    assert ScanProtocol.from_dict(stored) == protocol and ScanProtocol.from_dict({}) == ScanProtocol()
    with pytest.raises(ConfigError, match="not both .*window"):
        simulate_slice(hu, PIXEL_MM, 0.25, protocol=protocol, window="cosine")
    with pytest.raises(ConfigError, match="unknown key.*dose"):
        ScanProtocol.from_dict({"dose": 0.25})
    with pytest.raises(ConfigError, match="window must be one of"):
        ScanProtocol(window="gauss")
    with pytest.raises(ConfigError, match="bowtie must be a BowtieFilter or None"):
        ScanProtocol(bowtie="flat")  # type: ignore[arg-type]


def test_bad_shapes_and_spacing_raise():
    with pytest.raises(ConfigError, match="shape"):
        simulate_slice(np.zeros((4, 32, 32), np.float32), 1.0)
    with pytest.raises(ConfigError, match="pixel_spacing_mm"):
        simulate_slice(np.zeros((32, 32), np.float32), (1.0, 0.0), geometry=SMALL)


def test_benchmark_run_reports_seconds_per_mode():
    from langmamba.bench.simulate import run

    result = run(size=64, slices=1, device="cpu", geometry=SMALL)
    assert result["device"] == "cpu" and result["size"] == 64
    assert set(result["seconds_per_slice"]) == {"noise_insertion", "full"}
    assert all(s > 0 for s in result["seconds_per_slice"].values())


def test_cli_simulate_reports_native_calibration_or_takes_explicit_photons(tmp_path, capsys):
    from langmamba.cli import main
    from langmamba.io import read_volume, write_volume

    rng = np.random.default_rng(5)
    clean = np.stack([_water_cylinder(96, 2.5, radius=100.0) + 40.0] * 2)
    hu = clean + (clean > -900) * rng.normal(0.0, 8.0, clean.shape).astype(np.float32)
    source = write_volume(
        CTVolume(hu=hu, spacing=(2.5, 2.5, 5.0), origin=(0.0, 0.0, 0.0), source="memory"), tmp_path / "normal.nrrd"
    )
    out = tmp_path / "low.nrrd"
    assert main(["simulate", str(source), str(out), "--dose", "0.25", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "native noise" in printed and "variance ratio" in printed and "target 4.00" in printed
    low = read_volume(out).hu
    native_sd = estimate_noise(hu, 2.5)
    low_sd = estimate_noise(low, 2.5, mask=native_sd.mask)
    assert float(((low_sd.sigma_hu / native_sd.sigma_hu) ** 2).mean()) == pytest.approx(4.0, rel=0.2)
    assert (
        main(["simulate", str(source), str(tmp_path / "b.nrrd"), "--incident-photons", "1e5", "--device", "cpu"]) == 0
    )
    assert main(["simulate", str(source), str(tmp_path / "c.nrrd"), "--incident-photons", "many"]) == 2
    assert "--incident-photons" in capsys.readouterr().err
