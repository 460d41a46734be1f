"""Benchmark of the lower-dose simulation: seconds per slice for each reconstruction mode.

Run with ``python -m langmamba.bench.simulate --size 512 --slices 3``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import numpy as np
import torch

from langmamba.runtime import resolve_device, synchronize
from langmamba.simulate import (
    ELECTRONIC_NOISE,
    FULL_DOSE_PHOTONS,
    RECONSTRUCTIONS,
    FanBeamGeometry,
    simulate_slice,
)


def _phantom(size: int, spacing_mm: float) -> np.ndarray:
    """An elliptical water body with lungs, a bone ring and a contrast insert, ``(size, size)`` HU."""
    centre = (np.arange(size) - 0.5 * (size - 1)) * spacing_mm
    y, x = np.meshgrid(centre, centre, indexing="ij")
    hu = np.full((size, size), -1000.0, dtype=np.float32)
    hu[(x / 160.0) ** 2 + (y / 120.0) ** 2 <= 1.0] = 40.0
    for side in (-1.0, 1.0):
        hu[((x - side * 70.0) / 50.0) ** 2 + (y / 70.0) ** 2 <= 1.0] = -850.0
    ring = np.hypot(x, y + 80.0)
    hu[(ring > 12.0) & (ring < 18.0)] = 900.0
    hu[np.hypot(x, y - 40.0) < 15.0] = 250.0
    return hu


def run(
    size: int = 512,
    slices: int = 3,
    device: str = "auto",
    dose: float = 0.25,
    geometry: FanBeamGeometry | None = None,
) -> dict:
    """Time :func:`simulate_slice` on a synthetic ``size``² slice, once per reconstruction mode.

    One untimed warm-up call per mode, then ``slices`` timed calls (different seeds). The pixel
    spacing is chosen so the image spans 360 mm, as a body scan would. ``geometry`` defaults to the
    clinical :class:`FanBeamGeometry`.

    Returns:
        ``{"device", "size", "slices", "pixel_spacing_mm", "dose", "threads", "seconds_per_slice":
        {mode: wall s}, "cpu_seconds_per_slice": {mode: process CPU s, all threads}, "settings": {...}}``.
        On a shared machine the CPU seconds show the cost when the wall time is inflated by others.
    """
    target = resolve_device(device)
    spacing = 360.0 / size
    hu = _phantom(size, spacing)
    geometry = geometry or FanBeamGeometry()
    result: dict = {
        "device": str(target),
        "size": size,
        "slices": slices,
        "pixel_spacing_mm": spacing,
        "dose": dose,
        "threads": torch.get_num_threads(),
        "seconds_per_slice": {},
        "cpu_seconds_per_slice": {},
        "settings": {
            "geometry": {
                "source_to_isocenter_mm": geometry.source_to_isocenter_mm,
                "source_to_detector_mm": geometry.source_to_detector_mm,
                "n_channels": geometry.n_channels,
                "detector_element_mm": geometry.detector_element_mm,
                "n_views": geometry.n_views,
            },
            "incident_photons": FULL_DOSE_PHOTONS,
            "electronic_noise": ELECTRONIC_NOISE,
            "window": "hann",
        },
    }
    for mode in RECONSTRUCTIONS:
        options = dict(geometry=geometry, reconstruction=mode, device=target)
        simulate_slice(hu, spacing, dose, seed=0, **options)
        synchronize(target)
        start, cpu_start = time.perf_counter(), time.process_time()
        for k in range(slices):
            simulate_slice(hu, spacing, dose, seed=k + 1, **options)
        synchronize(target)
        result["seconds_per_slice"][mode] = (time.perf_counter() - start) / slices
        result["cpu_seconds_per_slice"][mode] = (time.process_time() - cpu_start) / slices
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: prints the :func:`run` result as JSON."""
    parser = argparse.ArgumentParser(prog="langmamba bench simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="slice width and height, pixels (default 512)")
    parser.add_argument("--slices", type=int, default=3, help="timed slices per mode (default 3)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    parser.add_argument("--dose", type=float, default=0.25, help="dose fraction (default 0.25)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.size, args.slices, args.device, args.dose), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
