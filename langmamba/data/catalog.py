"""The table of cases ``langmamba datasets`` prints: geometry, kernel, native noise, terms and split role."""

from __future__ import annotations

import numpy as np

from .cases import CASES, Case, load_case

NOISE_SLICES = 16
NOISE_METHOD = (
    "median over soft-tissue pixels (inside the body, local mean 0-100 HU) of the 7x7-pixel local "
    f"standard deviation, on up to {NOISE_SLICES} evenly spaced slices"
)


def _header_value(volume, keyword: str):
    header = getattr(volume, "dicom", None)
    if header is None or keyword not in header:
        return None
    value = header.get(keyword)
    return None if value in (None, "") else value


def describe_case(case: Case) -> dict:
    """One row of the table (reads the case; fetches its source when missing)."""
    from ..metrics import soft_tissue_noise

    loaded = load_case(case)
    volume = loaded.volume
    slices = volume.shape[0]
    picked = np.unique(np.linspace(0, slices - 1, min(slices, NOISE_SLICES)).round().astype(int))
    kernel = _header_value(volume, "ConvolutionKernel")
    thickness = _header_value(volume, "SliceThickness")
    return {
        "id": case.id,
        "role": case.role,
        "patient": case.patient,
        "patients": 1,
        "source": case.source,
        "collection": case.collection,
        "region": case.region,
        "slices": slices,
        "shape": list(volume.shape),
        "spacing_mm": [round(s, 4) for s in volume.spacing],
        "slice_thickness_mm": float(thickness) if thickness is not None else round(volume.spacing[2], 4),
        "kernel": "/".join(kernel) if isinstance(kernel, (list, tuple)) else (str(kernel) if kernel else None),
        "noise_sigma_hu": round(soft_tissue_noise(volume.hu[picked]), 1),
        "lesion_mask": None if loaded.lesion is None else int(loaded.lesion.sum()),
        "license": case.license,
        "data_terms": case.data_terms,
    }


def catalog(cases: list[Case] | None = None) -> list[dict]:
    """Rows of every case (default: all of :data:`CASES`, in table order)."""
    return [describe_case(c) for c in (cases or list(CASES.values()))]


def text_table(rows: list[dict], markdown: bool = False) -> str:
    """The rows as an aligned text table, or a Markdown table."""
    columns = [
        ("id", "case"),
        ("role", "role"),
        ("source", "source"),
        ("slices", "slices"),
        ("shape", "shape"),
        ("spacing_mm", "spacing x,y,z mm"),
        ("slice_thickness_mm", "thickness mm"),
        ("kernel", "kernel"),
        ("noise_sigma_hu", "noise σ HU"),
        ("lesion_mask", "lesion voxels"),
        ("license", "package licence"),
    ]

    def cell(row, key):
        value = row[key]
        if key == "shape":
            return "×".join(map(str, value))
        if key == "spacing_mm":
            return ", ".join(f"{v:g}" for v in value)
        return "–" if value is None else str(value)

    table = [[title for _, title in columns]] + [[cell(r, key) for key, _ in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(columns)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in table[1:]])
    widths = [max(len(r[i]) for r in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table)
