"""Build the example HTML report shown in the README (docs/screenshots/report.png).

Four slices of the held-out ``lung2`` study, a simulated quarter-dose scan of them, denoised and explained
(level 1, the 8 × 8 grid) with the shipped weights on the CPU. Run from the repository root:

    PYTHONPATH=$PWD .venv/bin/python docs/screenshots/report_example.py OUT_FOLDER

then take the screenshot with headless Chromium (see docs/screenshots/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from langmamba.denoise import denoise_study
from langmamba.io import read_volume, write_volume
from langmamba.io.volume import CTVolume
from langmamba.sample_data import sample_path
from langmamba.simulate import simulate_volume

SLICES = slice(28, 32)


def main(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    full = read_volume(sample_path("lung2"))
    offset = np.asarray(full.direction) @ (np.array([0.0, 0.0, SLICES.start]) * np.asarray(full.spacing))
    part = CTVolume(
        hu=np.ascontiguousarray(full.hu[SLICES]),
        spacing=full.spacing,
        origin=tuple(float(v) for v in np.asarray(full.origin) + offset),
        direction=full.direction,
    )
    low = simulate_volume(part, dose=0.25, seed=0, device="cpu")
    write_volume(low, folder / "lung2_quarter_dose.nrrd")
    written = denoise_study(
        folder / "lung2_quarter_dose.nrrd",
        folder / "denoised.nrrd",
        explain=folder / "explanations.json",
        report=folder / "report.html",
        level=1,
        device="cpu",
        overwrite=True,
        progress=False,
    )
    print("\n".join(f"{key}: {path}" for key, path in written.items()))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "out/report_example"))
