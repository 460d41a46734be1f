"""Reading and writing CT volumes: DICOM series, NIfTI, NRRD and MetaImage.

:func:`read_volume` returns a :class:`CTVolume` in HU with ITK/LPS geometry whatever the format,
:func:`write_volume` writes one atomically without ever replacing the input, and
:func:`describe_volume` summarises one for ``langmamba info``. Untrusted input (an upload to a server) is read
with ``read_volume(path, confined=True)``, a zipped series unpacked with :func:`extract_zip_series`. Every problem
with the input raises a subclass of :class:`langmamba.errors.InputError` that names the file and the problem.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exports load on first use, so light submodules (atomic writes, formats) import without pydicom or SimpleITK:
# training on a GPU machine needs neither.
_EXPORTS = {
    "AIR_HU": "langmamba.io.dicom",
    "CTVolume": "langmamba.io.volume",
    "Format": "langmamba.io.formats",
    "atomic_output": "langmamba.io.atomic",
    "check_not_input": "langmamba.io.atomic",
    "describe_volume": "langmamba.io.describe",
    "extract_zip_series": "langmamba.io.archive",
    "read_volume": "langmamba.io.api",
    "write_labels": "langmamba.io.api",
    "write_volume": "langmamba.io.api",
}

__all__ = [
    "AIR_HU",
    "CTVolume",
    "Format",
    "describe_volume",
    "extract_zip_series",
    "read_volume",
    "write_labels",
    "write_volume",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'langmamba.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_EXPORTS))
