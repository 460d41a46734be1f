"""A picture of every case: one slice each in the soft-tissue window, with the lesion mask outlined."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..visualize import CT_WINDOWS, save_figure
from .cases import CASES, Case, load_case


def montage_slice(case: Case) -> tuple[int, np.ndarray, np.ndarray | None, tuple[float, float]]:
    """``(index, slice HU (H, W), lesion (H, W) or None, (row, column) spacing mm)``: the slice with the largest
    lesion area when the case has a lesion mask, else the middle slice."""
    loaded = load_case(case)
    volume, lesion = loaded.volume, loaded.lesion
    if lesion is not None and lesion.any():
        z = int(np.argmax(lesion.reshape(lesion.shape[0], -1).sum(1)))
    else:
        z = volume.shape[0] // 2
    return z, volume.hu[z], None if lesion is None else lesion[z], (volume.spacing[1], volume.spacing[0])


def data_montage(
    path: str | Path,
    cases: list[Case] | None = None,
    columns: int = 4,
    window: tuple[float, float] = CT_WINDOWS["soft tissue"],
    noise: dict[str, float] | None = None,
) -> Path:
    """Write a PNG montage of one slice per case (default: every case) in ``window`` (HU); returns ``path``.

    ``noise`` (case id -> σ HU) adds the measured noise to the captions.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = cases or list(CASES.values())
    rows = -(-len(cases) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 4.1 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, case in zip(axes.ravel(), cases):
        z, hu, lesion, spacing = montage_slice(case)
        ax.imshow(
            hu, cmap="gray", vmin=window[0], vmax=window[1], aspect=spacing[0] / spacing[1], interpolation="nearest"
        )
        if lesion is not None and lesion.any():
            ax.contour(lesion.astype(float), levels=[0.5], colors="red", linewidths=0.8)
        caption = f"{case.id} [{case.role}]\n{case.region}, slice {z}"
        if noise and case.id in noise:
            caption += f", σ {noise[case.id]:.0f} HU"
        ax.set_title(caption, fontsize=9)
    fig.suptitle(
        f"langmamba training data, one slice per case, window [{window[0]:g}, {window[1]:g}] HU (red: lesion mask)",
        fontsize=11,
    )
    fig.tight_layout()
    return save_figure(fig, path, dpi=90)
