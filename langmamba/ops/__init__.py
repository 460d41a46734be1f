"""Selective-scan operators (Mamba's S6 recurrence) with interchangeable backends.

Use :func:`selective_scan`; it picks the fastest backend available for the tensors' device
(:func:`available_backends` lists them).
"""

from langmamba.ops.selective_scan_chunked import selective_scan_chunked
from langmamba.ops.selective_scan_interface import BACKENDS, available_backends, resolve_backend, selective_scan
from langmamba.ops.selective_scan_ref import selective_scan_ref

__all__ = [
    "BACKENDS",
    "available_backends",
    "resolve_backend",
    "selective_scan",
    "selective_scan_chunked",
    "selective_scan_ref",
]
