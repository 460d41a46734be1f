"""Noise against dose: σ in aortic ROIs, the variance ratio in soft tissue and the noise power spectrum.

Run with ``langmamba bench noise`` (doses, seed, input volume and a figure path are options). On the lung1
sample the ROIs are circles of 10 pixels radius in the blood pool, placed by hand (0.5703 mm pixels); the
table compares the measured σ with σ_orig / √dose, which the noise of a real scan at that dose would follow.
On any volume it reports the native-noise-aware calibration (photons solved so that dose d means native
variance / d), the variance ratio reached in soft tissue, and the noise power spectrum of the added noise
against the native one (``--nps FIGURE.png`` draws both).
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
    from langmamba.io import read_volume
    from langmamba.sample_data import sample_path
    import torch

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
        dose: simulate_batch(native, spacing, dose, incident_photons=calibrations[dose].incident_photons[slices],
                             device=device, seed=[seeds[z] for z in slices])
        for dose in all_doses
    }
    result: dict = {"volume": volume_path or "lung1", "seed": seed,
                    "calibration": {str(dose): c.line() for dose, c in calibrations.items()}}

    if calibrated:
        at = [slices.index(z) for z in calibrated]
        reference = estimate_noise(native[at], spacing)
        result["native_sigma_hu"] = {str(z): round(float(s), 2) for z, s in zip(calibrated, reference.sigma_hu)}
        result["variance_ratio_in_soft_tissue"] = {
            str(dose): {"target": round(1.0 / dose, 3), "per_slice": [round(float(r), 3) for r in _ratios(
                estimate_noise(out[at], spacing, mask=reference.mask).sigma_hu.numpy(),
                reference.sigma_hu.numpy())]}
            for dose, out in simulated.items()
        }
        tissue = flat_soft_tissue(torch.from_numpy(native[at]), window_pixels(spacing)).numpy()
        result["nps"] = _nps_report(native[at], simulated[nps_dose][at], spacing, tissue, nps_dose, nps_figure)
    if roi_slices:
        result["roi_radius_px"] = RADIUS_PX
        result["table"] = _roi_table(native, simulated, slices, doses)
    return result


def _ratios(out_sigma: np.ndarray, native_sigma: np.ndarray) -> np.ndarray:
    ok = np.isfinite(out_sigma) & np.isfinite(native_sigma)
    return (out_sigma[ok] / native_sigma[ok]) ** 2


def _roi_table(native: np.ndarray, simulated: dict, slices: list[int], doses: Sequence[float]) -> dict:
    yy, xx = np.mgrid[: native.shape[1], : native.shape[2]]
    table = {}
    for name, (z, x, y) in ROIS.items():
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= RADIUS_PX**2
        original = native[slices.index(z)][disc]
        rows = [{"dose": 1.0, "sigma_hu": round(float(np.std(original, ddof=1)), 2),
                 "mean_hu": round(float(original.mean()), 1)}]
        for dose in doses:
            values = simulated[dose][slices.index(z)][disc]
            rows.append({"dose": dose, "sigma_hu": round(float(np.std(values, ddof=1)), 2),
                         "mean_hu": round(float(values.mean()), 1),
                         "expected_sigma_hu": round(rows[0]["sigma_hu"] / np.sqrt(dose), 2)})
        table[f"{name} (slice {z}, x={x}, y={y})"] = rows
    return table


def _nps_report(
    native: np.ndarray, simulated: np.ndarray, spacing: tuple[float, float], tissue: np.ndarray, dose: float,
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
    for ax, (a, b), unit in ((left, (added.nps, native.nps), "HU² mm²"),
                             (right, (added.normalised(), native.normalised()), "normalised")):
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
    args = parser.parse_args(argv)
    print(json.dumps(run(args.doses, args.seed, args.device, args.input, args.nps, args.nps_dose), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
