"""The in-memory CT volume every part of langmamba passes around."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with its patient-space geometry.

    Conventions follow ITK/DICOM so geometry survives every format unchanged:

    - ``hu``: float32 array of shape ``(Z, Y, X)`` = (slices, rows, columns), values in HU.
    - ``spacing``: ``(x, y, z)`` voxel size in mm (column, row, slice spacing).
    - ``origin``: ``(x, y, z)`` centre of voxel ``[0, 0, 0]`` in patient LPS mm.
    - ``direction``: 3×3 matrix whose *columns* are the LPS unit vectors of the x, y and z array axes.
    - ``dicom``: for DICOM input, the header of the first slice (pixel data removed) as a
      :class:`pydicom.Dataset`, so a derived series can keep patient and study attributes;
      ``None`` for other formats.
    - ``source``: where the volume was read from (path as text), ``None`` if made in memory.
    """

    hu: NDArray[np.float32]
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: NDArray[np.float64] = field(default_factory=lambda: np.eye(3))
    dicom: Any = None
    source: str | None = None

    def __post_init__(self) -> None:
        self.hu = np.asarray(self.hu, dtype=np.float32)
        if self.hu.ndim != 3:
            raise ValueError(f"CTVolume.hu must be 3-D (Z, Y, X), got shape {self.hu.shape}")
        sx, sy, sz = (float(s) for s in self.spacing)
        ox, oy, oz = (float(o) for o in self.origin)
        self.spacing, self.origin = (sx, sy, sz), (ox, oy, oz)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        z, y, x = self.hu.shape
        return z, y, x

    def affine_lps(self) -> NDArray[np.float64]:
        """4×4 matrix mapping voxel index ``(x, y, z, 1)`` (column, row, slice) to LPS mm."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction @ np.diag(self.spacing)
        affine[:3, 3] = self.origin
        return affine

    def affine_ras(self) -> NDArray[np.float64]:
        """Same as :meth:`affine_lps` but to RAS mm (NIfTI, MONAI, 3D Slicer)."""
        flip: NDArray[np.float64] = np.diag([-1.0, -1.0, 1.0, 1.0])
        return flip @ self.affine_lps()

    def index_to_lps(self, ijk: NDArray[Any]) -> NDArray[np.float64]:
        """Voxel indices ``(..., 3)`` in (x, y, z) = (column, row, slice) order → LPS mm ``(..., 3)``."""
        index = np.asarray(ijk, dtype=np.float64)
        lps: NDArray[np.float64] = index @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)
        return lps

    def with_hu(self, hu: NDArray[Any]) -> CTVolume:
        """A copy with new voxel values and the same geometry and DICOM header."""
        return replace(self, hu=hu)
