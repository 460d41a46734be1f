"""What each storage choice of the prepared training set costs, in MiB, over all training and validation cases.

Run: ``python scripts/prepared_size_costs.py`` (reads the cases from the data cache; a few minutes on 2 cores).
Rows: whole 512² slices vs body crops, int16 raw vs zlib (``np.savez_compressed``) vs LZMA of byte planes (format
2 of ``langmamba.data.prepared``), RIDER with all 236 slices vs every 4th.
"""

from __future__ import annotations

import lzma
import zlib

import numpy as np

from langmamba.data.cases import TRAINING, VALIDATION, cases_in, load_case
from langmamba.data.crop import body_box


def planes(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values.astype("<i2").view(np.uint8).reshape(-1, 2).T).tobytes()


def main() -> None:
    totals: dict[str, float] = {}
    for case in cases_in(TRAINING, VALIDATION):
        hu = load_case(case).volume.hu
        for z in range(hu.shape[0]):
            whole = hu[z].astype(np.int16)
            top, left, height, width = body_box(hu[z])
            crop = whole[top : top + height, left : left + width]
            thinned = case.id != "rider" or z % 4 == 0
            sizes = {
                "whole raw": whole.nbytes,
                "whole zlib": len(zlib.compress(whole.tobytes(), 6)),
                "crop raw": crop.nbytes,
                "crop zlib": len(zlib.compress(crop.tobytes(), 6)),
                "crop lzma planes": len(lzma.compress(planes(crop), preset=6)),
            }
            for name, size in sizes.items():
                totals[name] = totals.get(name, 0) + size
                if thinned:
                    totals[f"{name}, rider every 4th"] = totals.get(f"{name}, rider every 4th", 0) + size
    for name, size in totals.items():
        print(f"{name:40s} {size / 2**20:7.1f} MiB")


if __name__ == "__main__":
    main()
