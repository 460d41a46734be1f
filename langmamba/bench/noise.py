"""Noise against dose on the lung1 sample: σ in uniform aortic ROIs of the original and simulated scans.

Run with ``langmamba bench noise`` (seed and doses are options). The ROIs are circles of 10 pixels radius in the
blood pool, placed by hand on lung1 (0.5703 mm pixels); the table compares the measured σ with σ_orig / √dose,
which the noise of a real scan at that dose would follow.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence

import numpy as np

ROIS = {  # name: (slice, column x, row y)
    "ascending aorta": (20, 272, 290),
    "descending aorta": (10, 312, 412),
}
RADIUS_PX = 10


def run(doses: Sequence[float] = (0.5, 0.25, 0.1), seed: int = 2025, device: str = "auto") -> dict:
    from langmamba.io import read_volume
    from langmamba.sample_data import sample_path
    from langmamba.simulate import simulate_volume

    volume = read_volume(sample_path("lung1", "image"))
    yy, xx = np.mgrid[: volume.shape[1], : volume.shape[2]]
    table = {}
    for name, (z, x, y) in ROIS.items():
        disc = (yy - y) ** 2 + (xx - x) ** 2 <= RADIUS_PX**2
        original = volume.hu[z][disc]
        rows = [{"dose": 1.0, "sigma_hu": round(float(np.std(original, ddof=1)), 2),
                 "mean_hu": round(float(original.mean()), 1)}]
        single = volume.with_hu(volume.hu[z:z + 1])
        for dose in doses:
            values = simulate_volume(single, dose=dose, seed=seed, device=device).hu[0][disc]
            rows.append({"dose": dose, "sigma_hu": round(float(np.std(values, ddof=1)), 2),
                         "mean_hu": round(float(values.mean()), 1),
                         "expected_sigma_hu": round(rows[0]["sigma_hu"] / np.sqrt(dose), 2)})
        table[f"{name} (slice {z}, x={x}, y={y})"] = rows
    return {"volume": "lung1", "seed": seed, "roi_radius_px": RADIUS_PX, "table": table}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="langmamba bench noise", description=__doc__.splitlines()[0])
    parser.add_argument("--doses", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.doses, args.seed, args.device), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
