"""Noise against dose: σ in aortic ROIs, the variance ratio in soft tissue and the noise power spectrum.

Run with ``langmamba bench noise`` (doses, seed, input volume and a figure path are options). On the lung1
sample the ROIs are circles of 10 pixels radius in the blood pool, placed by hand (0.5703 mm pixels); the
table compares the measured σ with σ_orig / √dose, which the noise of a real scan at that dose would follow.
On any volume it reports the native-noise-aware calibration (photons solved so that dose d means native
variance / d), the variance ratio reached in soft tissue, and the noise power spectrum of the added noise
against the native one (``--nps FIGURE.png`` draws both). ``--phantom`` measures the wide-body phantom with
arms of issue 15 instead.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROIS = {  # name: (slice, column x, row y)
    "ascending aorta": (20, 272, 290),
    "descending aorta": (10, 312, 412),
}
RADIUS_PX = 10
NPS_ROI_PX = 32


def run(
    doses: Sequence[float] = (0.5, 0.25, 0.1),
    seed: int = 2025,
    device: str = "auto",
    volume_path: str | None = None,
    nps_figure: str | None = None,
    nps_dose: float = 0.25,
) -> dict:
    """The noise report of ``volume_path`` (default: the lung1 sample) as a JSON-ready dict."""
    import torch

    from langmamba.io import read_volume
    from langmamba.sample_data import sample_path
    from langmamba.simulate import calibrate_volume, derive_slice_seeds, estimate_noise, simulate_batch
    from langmamba.simulate.calibration import flat_soft_tissue, window_pixels

    volume = read_volume(volume_path or sample_path("lung1", "image"))
    spacing = (volume.spacing[1], volume.spacing[0])
    all_doses = sorted(set(doses) | {nps_dose})
    calibrations = {dose: calibrate_volume(volume, dose, seed=seed, device=device) for dose in all_doses}
    seeds = derive_slice_seeds(seed, volume.hu.shape[0])
    calibrated = calibrations[nps_dose].slices
    roi_slices = sorted({z for z, _, _ in ROIS.values()}) if volume_path is None else []
    slices = sorted(set(calibrated) | set(roi_slices))
    native = np.asarray(volume.hu[slices], dtype=np.float32)
    simulated = {
        dose: simulate_batch(
            native,
            spacing,
            dose,
            incident_photons=calibrations[dose].incident_photons[slices],
            device=device,
            seed=[seeds[z] for z in slices],
        )
        for dose in all_doses
    }
    result: dict = {
        "volume": volume_path or "lung1",
        "seed": seed,
        "calibration": {str(dose): c.line() for dose, c in calibrations.items()},
    }

    if calibrated:
        at = [slices.index(z) for z in calibrated]
        reference = estimate_noise(native[at], spacing)
        result["native_sigma_hu"] = {str(z): round(float(s), 2) for z, s in zip(calibrated, reference.sigma_hu)}
        result["variance_ratio_in_soft_tissue"] = {
            str(dose): {
                "target": round(1.0 / dose, 3),
                "per_slice": [
                    round(float(r), 3)
                    for r in _ratios(
                        estimate_noise(out[at], spacing, mask=reference.mask).sigma_hu.numpy(),
                        reference.sigma_hu.numpy(),
                    )
                ],
            }
            for dose, out in simulated.items()
        }
        tissue = flat_soft_tissue(torch.from_numpy(native[at]), window_pixels(spacing)).numpy()
        result["nps"] = _nps_report(native[at], simulated[nps_dose][at], spacing, tissue, nps_dose, nps_figure)
    if roi_slices:
        result["roi_radius_px"] = RADIUS_PX
        result["table"] = _roi_table(native, simulated, slices, doses)
    return result


def wide_body_phantom(size: int = 512, fov_mm: float = 500.0) -> tuple[np.ndarray, np.ndarray, float]:
    """A wide abdomen with both arms at the sides, the case of issue 15.

    A 35 x 25 cm soft-tissue ellipse (40 HU) with a spine (800 HU), and two arms (7 x 9 cm, 40 HU, with a
    900 HU bone) centred 21.2 cm off the axis: 49 cm across in a ``fov_mm`` field of view.

    Returns:
        ``(hu (size, size) float32, interior (size, size) bool soft tissue away from edges and bone, pixel mm)``.
    """
    spacing = fov_mm / size
    centre = (np.arange(size) - 0.5 * (size - 1)) * spacing
    y, x = np.meshgrid(centre, centre, indexing="ij")
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[(x / 175.0) ** 2 + (y / 125.0) ** 2 <= 1.0] = 40.0
    hu[np.hypot(x, y + 70.0) <= 18.0] = 800.0
    for side in (-1.0, 1.0):
        hu[((x - side * 212.0) / 35.0) ** 2 + (y / 45.0) ** 2 <= 1.0] = 40.0
        hu[np.hypot(x - side * 212.0, y) <= 12.0] = 900.0
    interior = ((x / 150.0) ** 2 + (y / 100.0) ** 2 <= 1.0) & (np.hypot(x, y + 70.0) > 30.0)
    return hu, interior, spacing


def phantom_run(
    dose: float = 0.25, size: int = 512, native_photons: float = 1e6, seed: int = 5, device: str = "auto"
) -> dict:
    """Added noise on :func:`wide_body_phantom` at ``dose``: fixed photons, native-aware, and without the scanner model.

    The "native" scan is the phantom through the full noise model at ``native_photons`` (dose 1), so its
    true noise is known; the added σ is compared with √(native variance · (1/dose − 1)).
    """
    from langmamba.simulate import native_incident_photons, simulate_slice

    clean, interior, spacing = wide_body_phantom(size)
    native = simulate_slice(
        clean, spacing, 1.0, seed=seed + 1, input_is_noise_free=True, incident_photons=native_photons, device=device
    )
    native_var = float((native - clean)[interior].var())
    calibration = native_incident_photons(native, spacing, dose, device=device)
    solved = float(calibration.incident_photons[0])
    runs = {
        "fixed photons 2e5": {},
        f"native-aware photons {solved:.3g}": {"incident_photons": solved},
        "native-aware, no bowtie/modulation/low-signal": {
            "incident_photons": solved,
            "bowtie": None,
            "modulation": None,
            "low_signal": None,
        },
    }
    rows = {}
    for name, options in runs.items():
        out = simulate_slice(native, spacing, dose, seed=seed, device=device, **options)
        added = (out - native)[interior]
        rows[name] = {
            "added_sigma_hu": round(float(added.std()), 2),
            "p99_9_abs_added_hu": round(float(np.percentile(np.abs(added), 99.9)), 1),
            "variance_ratio": round(float((out - clean)[interior].var()) / native_var, 3),
        }
    return {
        "phantom": f"wide body with arms, {size}² over 500 mm",
        "dose": dose,
        "native_sigma_hu": round(native_var**0.5, 2),
        "implied_added_sigma_hu": round((native_var * (1.0 / dose - 1.0)) ** 0.5, 2),
        "target_variance_ratio": round(1.0 / dose, 3),
        "runs": rows,
    }


def _ratios(out_sigma: np.ndarray, native_sigma: np.ndarray) -> np.ndarray:
    ok = np.isfinite(out_sigma) & np.isfinite(native_sigma)
    return (out_sigma[ok] / native_sigma[ok]) ** 2


def _roi_table(native: np.ndarray, simulated: dict, slices: list[int], doses: Sequence[float]) -> dict:
    yy, xx = np.mgrid[: native.shape[1], : native.shape[2]]
    table = {}
    for name, (z, x, y) in ROIS.items():
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= RADIUS_PX**2
        original = native[slices.index(z)][disc]
        rows = [
            {
                "dose": 1.0,
                "sigma_hu": round(float(np.std(original, ddof=1)), 2),
                "mean_hu": round(float(original.mean()), 1),
            }
        ]
        for dose in doses:
            values = simulated[dose][slices.index(z)][disc]
            rows.append(
                {
                    "dose": dose,
                    "sigma_hu": round(float(np.std(values, ddof=1)), 2),
                    "mean_hu": round(float(values.mean()), 1),
                    "expected_sigma_hu": round(rows[0]["sigma_hu"] / np.sqrt(dose), 2),
                }
            )
        table[f"{name} (slice {z}, x={x}, y={y})"] = rows
    return table


def _nps_report(
    native: np.ndarray,
    simulated: np.ndarray,
    spacing: tuple[float, float],
    tissue: np.ndarray,
    dose: float,
    figure: str | None,
) -> dict:
    """NPS of the added noise (simulated - native) against the native noise, in the same soft-tissue ROIs."""
    from langmamba.simulate.nps import compare_nps, noise_power_spectrum, roi_corners

    # ROIs wholly inside soft tissue (-20..120 HU, eroded by the noise window), on every calibrated slice.
    corners = [roi_corners(m, NPS_ROI_PX) for m in tissue]
    if not any(corners):
        return {"error": f"no {NPS_ROI_PX}x{NPS_ROI_PX}-pixel ROI lies wholly in flat soft tissue"}
    added = noise_power_spectrum(simulated - native, spacing, corners, roi_px=NPS_ROI_PX)
    own = noise_power_spectrum(native, spacing, corners, roi_px=NPS_ROI_PX)
    report = {"dose": dose, "roi_px": NPS_ROI_PX, **compare_nps(added, own)}
    report = {k: _rounded(v) for k, v in report.items()}
    if figure:
        report["figure"] = str(_nps_figure(added, own, dose, Path(figure)))
    return report


def _rounded(value):
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 4) if isinstance(value, float) else value


def _nps_figure(added, native, dose: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from langmamba.visualize import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (a, b), unit in (
        (left, (added.nps, native.nps), "HU² mm²"),
        (right, (added.normalised(), native.normalised()), "normalised"),
    ):
        ax.plot(added.frequency, a, label=f"added at dose {dose:g} ({added.n_rois} ROIs)")
        ax.plot(native.frequency, b, label="native (same ROIs)")
        ax.set_xlabel("spatial frequency (cycles/mm)")
        ax.set_ylabel(f"NPS ({unit})")
        ax.legend()
    left.set_title("noise power spectrum")
    right.set_title("shape (area 1)")
    fig.tight_layout()
    return save_figure(fig, path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="langmamba bench noise", description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--input", default=None, help="a normal-dose CT volume (default: the lung1 sample)")
    parser.add_argument("--nps", default=None, metavar="FIGURE.png", help="draw the noise power spectra here")
    parser.add_argument("--nps-dose", type=float, default=0.25, help="dose of the NPS comparison (default 0.25)")
    parser.add_argument(
        "--phantom",
        action="store_true",
        help="instead: the wide-body phantom with arms at --nps-dose (added σ, streaks, ratio)",
    )
    args = parser.parse_args(argv)
    if args.phantom:
        print(json.dumps(phantom_run(args.nps_dose, device=args.device), indent=2))
        return 0
    print(json.dumps(run(args.doses, args.seed, args.device, args.input, args.nps, args.nps_dose), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
