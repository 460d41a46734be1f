"""Figures people look at instead of numbers: CT panels side by side in a display window."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft tissue": (-160.0, 240.0),
    "lung": (-1350.0, 150.0),
    "bone": (-450.0, 1050.0),
}


def comparison_figure(
    panels: list[tuple[str, np.ndarray]],
    *,
    window: tuple[float, float] = CT_WINDOWS["soft tissue"],
    difference: tuple[int, int] | None = None,
    difference_range_hu: float = 100.0,
    title: str | None = None,
    spacing_mm: tuple[float, float] = (1.0, 1.0),
):
    """A matplotlib figure of 2-D HU slices side by side, and optionally the difference of two of them.

    Args:
        panels: (caption, slice (H, W) in HU) pairs, shown left to right in ``window`` (HU).
        difference: indices ``(a, b)`` of two panels; adds a panel of ``a - b`` in ±``difference_range_hu``.
        spacing_mm: (row, column) pixel size, so anisotropic pixels keep their true aspect ratio.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(panels) + (difference is not None)
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 4.6), squeeze=False)
    axes = axes[0]
    aspect = spacing_mm[0] / spacing_mm[1]
    for ax, (caption, image) in zip(axes, panels):
        ax.imshow(image, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="nearest")
        ax.set_title(caption, fontsize=11)
    if difference is not None:
        a, b = difference
        diff = np.asarray(panels[a][1], np.float32) - np.asarray(panels[b][1], np.float32)
        ax = axes[-1]
        shown = ax.imshow(
            diff,
            cmap="RdBu_r",
            vmin=-difference_range_hu,
            vmax=difference_range_hu,
            aspect=aspect,
            interpolation="nearest",
        )
        ax.set_title(f"{panels[a][0]} − {panels[b][0]}", fontsize=11)
        fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="HU")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title or f"window [{window[0]:g}, {window[1]:g}] HU", fontsize=12)
    fig.tight_layout()
    return fig


def save_figure(fig, path: str | Path, dpi: int = 110, overwrite: bool = True) -> Path:
    """Save a figure as PNG atomically (written beside ``path``, then renamed into place) and close it."""
    import matplotlib.pyplot as plt

    from .io.atomic import atomic_output

    path = Path(path)
    with atomic_output(path, as_folder=False, overwrite=overwrite) as staging:
        fig.savefig(staging / path.name, dpi=dpi, format="png")
    plt.close(fig)
    return path
