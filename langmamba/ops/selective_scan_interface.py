"""The public selective scan: one signature, the backend picked per call.

Backends (all hold mamba-ssm's ``selective_scan_fn`` conventions, see :mod:`selective_scan_ref`):

- ``"mamba_ssm"``: mamba-ssm's fused CUDA kernel, when the package and its compiled extension import;
- ``"triton"``: our Triton kernel (:mod:`selective_scan_triton`) for CUDA tensors, or CPU tensors
  under Triton's interpreter (``TRITON_INTERPRET=1``, for tests);
- ``"chunked"``: the vectorised PyTorch path (:mod:`selective_scan_chunked`), the CPU default;
- ``"reference"``: the sequential loop, ground truth for tests (slow).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable

import torch

from langmamba.errors import ConfigError
from langmamba.ops.selective_scan_chunked import selective_scan_chunked
from langmamba.ops.selective_scan_ref import selective_scan_ref

logger = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("mamba_ssm", "triton", "chunked", "reference")
"""Every backend name :func:`selective_scan` understands (besides ``"auto"``)."""


@functools.cache
def _mamba_ssm_scan() -> Callable[..., torch.Tensor] | None:
    """mamba-ssm's ``selective_scan_fn`` if the package and its CUDA extension load, else ``None``."""
    try:
        # The compiled extension is what matters: mamba_ssm alone imports on machines where it cannot run.
        import selective_scan_cuda  # noqa: F401
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError, RuntimeError) as error:
        logger.debug("mamba_ssm selective scan unavailable: %s", error)
        return None
    scan: Callable[..., torch.Tensor] = selective_scan_fn
    return scan


@functools.cache
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except (ImportError, OSError, RuntimeError) as error:
        logger.debug("triton unavailable: %s", error)
        return False
    return True


def _triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def available_backends() -> list[str]:
    """Backends whose dependencies load in this process, fastest first.

    ``"mamba_ssm"`` and ``"triton"`` additionally need CUDA tensors (Triton also runs CPU tensors under
    ``TRITON_INTERPRET=1``); ``"chunked"`` and ``"reference"`` run anywhere.
    """
    names = []
    if _mamba_ssm_scan() is not None:
        names.append("mamba_ssm")
    if _triton_importable():
        names.append("triton")
    return names + ["chunked", "reference"]


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The backend that ``selective_scan(..., backend=backend)`` runs for tensors on ``device``.

    ``"auto"`` gives ``"mamba_ssm"`` if it loads and the device is CUDA, else ``"triton"`` if it loads
    and the device is CUDA, else ``"chunked"``.

    Raises:
        ConfigError: an unknown name, or a backend that cannot run on ``device`` in this process.
    """
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    if backend == "auto":
        if on_cuda and _mamba_ssm_scan() is not None:
            return "mamba_ssm"
        if on_cuda and _triton_importable():
            return "triton"
        return "chunked"
    if backend not in BACKENDS:
        raise ConfigError(f"unknown selective-scan backend {backend!r}; choose one of auto, {', '.join(BACKENDS)}")
    if backend == "mamba_ssm":
        if _mamba_ssm_scan() is None:
            raise ConfigError("selective-scan backend 'mamba_ssm' needs the mamba-ssm package with its CUDA extension")
        if not on_cuda:
            raise ConfigError(f"selective-scan backend 'mamba_ssm' needs CUDA tensors, got {device.type} tensors")
    if backend == "triton":
        if not _triton_importable():
            raise ConfigError("selective-scan backend 'triton' needs the triton package")
        if not on_cuda and not _triton_interpreting():
            raise ConfigError(
                f"selective-scan backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device.type} tensors"
            )
    return backend


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` conventions; ``(batch, D, L)`` in ``u``'s dtype.

    Args:
        u: input ``(batch, D, L)``.
        delta: step sizes before bias/softplus ``(batch, D, L)``.
        A: real state matrix diagonal ``(D, N)`` (negative for a decaying state).
        B: input projection ``(batch, N, L)`` or grouped ``(batch, G, N, L)``.
        C: output projection, same layouts as ``B``.
        D: skip weight ``(D,)``.
        z: gate ``(batch, D, L)``; the output is multiplied by ``silu(z)``.
        delta_bias: ``(D,)`` added to ``delta`` before the softplus.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        backend: ``"auto"`` or one of :data:`BACKENDS` (see :func:`resolve_backend`).
    """
    name = resolve_backend(backend, u.device)
    if name == "mamba_ssm":
        scan = _mamba_ssm_scan()
        assert scan is not None, "resolve_backend names mamba_ssm only when it loads"
        fused: torch.Tensor = scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return fused
    if name == "triton":
        from langmamba.ops.selective_scan_triton import selective_scan_triton

        # Typed as Any outside: torch.compiler.disable, its decorator, is untyped.
        out: torch.Tensor = selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return out
    if name == "reference":
        return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
    return selective_scan_chunked(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
