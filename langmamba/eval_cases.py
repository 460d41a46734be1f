"""Evaluation cases in one ``.npz``: the held-out lung2 and the validation patients, normal dose only.

``langmamba evaluate --export-npz FILE`` writes it where the data lives (it reads DICOM/NRRD); the evaluation
then runs from the file on a machine with only numpy, scipy, torch and bm3d (a GPU host without the imaging
stack). Arrays per case ``c``: ``c/hu`` (Z, H, W) int16 HU (float32 where not integral), ``c/spacing_mm``
(row, column), ``c/role`` (``test`` or ``validation``), optional ``c/label`` (Z, H, W) lesion mask. Validation
slices body-cropped by the prepared set are put back at their offset on an air (-1000 HU) canvas, so one patient
is one case.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .io.atomic import write_npz

FORMAT = 1
TEST_CASE = "lung2"


@dataclass
class EvalCase:
    """One patient: normal-dose ``hu`` (Z, H, W) in HU, pixel ``spacing_mm`` (row, column), ``role``
    (``test`` or ``validation``) and an optional lesion ``label`` (Z, H, W)."""

    name: str
    hu: np.ndarray
    spacing_mm: tuple[float, float]
    role: str
    label: np.ndarray | None = None


def _central(array: np.ndarray, count: int | None) -> np.ndarray:
    if count is None or array.shape[0] <= count:
        return array
    start = (array.shape[0] - count) // 2
    return array[start : start + count]


def spread_indices(count_total: int, count: int | None) -> np.ndarray:
    """``count`` slice indices spread evenly over ``count_total`` (all when ``count`` is None)."""
    if count is None or count_total <= count:
        return np.arange(count_total)
    return np.unique(np.linspace(0, count_total - 1, count).round().astype(int))


def held_out_case(max_slices: int | None = None) -> EvalCase:
    """lung2 from the sample-data cache (fetched once), its central ``max_slices`` slices."""
    from .io import read_volume
    from .sample_data import sample_path

    volume = read_volume(sample_path(TEST_CASE, "image"))
    label = read_volume(sample_path(TEST_CASE, "label"), check_hu=False).hu > 0
    return EvalCase(
        TEST_CASE,
        _central(volume.hu.astype(np.float32), max_slices),
        (float(volume.spacing[1]), float(volume.spacing[0])),
        "test",
        _central(label, max_slices),
    )


def validation_cases(
    prepared: str | Path, patients: list[str] | None = None, max_slices: int | None = None
) -> list[EvalCase]:
    """The validation patients of a prepared training set (by split role, or the named ``patients``), at most
    ``max_slices`` slices each, spread over the patient."""
    from .data.prepared import load_prepared

    slices, _ = load_prepared(prepared)
    if patients is None:
        chosen = [s for s in slices if s.role == "validation"]
        if not chosen:
            raise InputError(f"{prepared} marks no slice as validation; name the validation patients")
    else:
        unknown = set(patients) - {s.patient for s in slices}
        if unknown:
            raise InputError(f"validation patients not in {prepared}: {sorted(unknown)}")
        chosen = [s for s in slices if s.patient in patients]
    if any(s.patient == TEST_CASE for s in chosen):
        raise InputError(f"{TEST_CASE} is the test case; it cannot be a validation patient")
    groups: dict[tuple, list] = {}
    for s in chosen:
        groups.setdefault((s.patient, tuple(s.spacing_mm)), []).append(s)
    cases = []
    for (patient, spacing), members in groups.items():
        members = [members[i] for i in spread_indices(len(members), max_slices)]
        hu, label = _place(members)
        name = patient if sum(key[0] == patient for key in groups) == 1 else f"{patient}@{spacing[0]:.3f}mm"
        cases.append(EvalCase(name, hu, (float(spacing[0]), float(spacing[1])), "validation", label))
    return cases


def _place(members: list) -> tuple[np.ndarray, np.ndarray | None]:
    """Slices of one patient on one canvas: body crops go back to their offset in the uncropped slice, the rest
    of the canvas is air (-1000 HU), so slices cropped to different boxes stack into one (Z, H, W) case."""
    offsets = [tuple(getattr(s, "offset", None) or (0, 0)) for s in members]
    height = max(o[0] + s.full.shape[0] for o, s in zip(offsets, members))
    width = max(o[1] + s.full.shape[1] for o, s in zip(offsets, members))
    hu = np.full((len(members), height, width), -1000.0, np.float32)
    has_label = any(s.label is not None for s in members)
    label = np.zeros(hu.shape, bool) if has_label else None
    for z, ((top, left), s) in enumerate(zip(offsets, members)):
        rows, cols = s.full.shape
        hu[z, top : top + rows, left : left + cols] = s.full
        if s.label is not None:
            label[z, top : top + rows, left : left + cols] = s.label > 0
    return hu, label


def _compact(hu: np.ndarray) -> np.ndarray:
    if np.all(hu == np.rint(hu)) and hu.min() >= -32768 and hu.max() <= 32767:
        return hu.astype(np.int16)
    return hu.astype(np.float32)


def save_cases(cases: list[EvalCase], path: str | Path) -> Path:
    """Write ``cases`` to ``path`` (compressed ``.npz``, written beside it and renamed into place)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"the evaluation cases file must end in .npz, got {path}")
    arrays: dict[str, np.ndarray] = {"format": np.array(FORMAT), "cases": np.array([c.name for c in cases])}
    for c in cases:
        arrays[f"{c.name}/hu"] = _compact(c.hu)
        arrays[f"{c.name}/spacing_mm"] = np.asarray(c.spacing_mm, np.float64)
        arrays[f"{c.name}/role"] = np.array(c.role)
        if c.label is not None:
            arrays[f"{c.name}/label"] = np.asarray(c.label, bool)
    return write_npz(path, arrays)


def load_cases(path: str | Path) -> list[EvalCase]:
    """The cases of a file written by :func:`save_cases`."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(
            f"{path} is not an evaluation cases file (.npz from `langmamba evaluate --export-npz`): {error}"
        ) from None
    with archive:
        if "format" not in archive or int(archive["format"]) != FORMAT:
            raise InputError(f"{path} is not an evaluation cases file of format {FORMAT}")
        cases = []
        for name in (str(n) for n in archive["cases"]):
            label = archive.get(f"{name}/label", None)
            cases.append(
                EvalCase(
                    name,
                    archive[f"{name}/hu"].astype(np.float32),
                    tuple(float(v) for v in archive[f"{name}/spacing_mm"]),
                    str(archive[f"{name}/role"]),
                    label,
                )
            )
    return cases
