"""Selective-scan operators (Mamba's S6 recurrence) with interchangeable backends.

Use :func:`selective_scan`; it picks the fastest backend available for the tensors' device
(:func:`available_backends` lists them). Each backend also lives in its own module
(``selective_scan_ref``, ``selective_scan_chunked``, ``selective_scan_triton``) under the same name.
"""

from langmamba.ops.selective_scan_interface import BACKENDS, available_backends, resolve_backend, selective_scan

__all__ = ["BACKENDS", "available_backends", "resolve_backend", "selective_scan"]
