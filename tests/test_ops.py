"""Selective-scan backends: each one equals the sequential reference, forward and backward (fp32).

The Triton backend runs on the GPU when CUDA is present, else on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1`` is set here before the kernels are first imported).
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
if HAS_TRITON and not HAS_CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from langmamba.errors import ConfigError, InputError  # noqa: E402
from langmamba.ops import BACKENDS, available_backends, resolve_backend, selective_scan  # noqa: E402
from langmamba.ops.selective_scan_chunked import default_chunk_size, selective_scan_chunked  # noqa: E402
from langmamba.ops.selective_scan_ref import selective_scan_ref  # noqa: E402

# (backend, device) pairs under test: every available backend on every device it runs on here.
FAST_BACKENDS = [("chunked", "cpu")] + [("chunked", "cuda")] * HAS_CUDA
if "triton" in available_backends():
    FAST_BACKENDS.append(("triton", "cuda" if HAS_CUDA else "cpu"))
if "mamba_ssm" in available_backends() and HAS_CUDA:
    FAST_BACKENDS.append(("mamba_ssm", "cuda"))
IDS = [f"{name}-{device}" for name, device in FAST_BACKENDS]
# The CUDA cases carry the `gpu` marker (the `make test-quick` lane leaves them out).
FAST_BACKENDS = [pytest.param(*case, marks=pytest.mark.gpu) if case[1] == "cuda" else case for case in FAST_BACKENDS]

CASES = {
    # name: (batch, D, N, L, groups or None, with D/z/delta_bias/softplus)
    "plain": (2, 4, 3, 37, None, False),
    "full": (2, 4, 4, 37, None, True),
    "grouped": (2, 6, 4, 29, 3, True),
}


def _inputs(batch, dim, state, length, groups, full, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    bc_shape = (batch, state, length) if groups is None else (batch, groups, state, length)
    tensors = {
        "u": torch.randn(batch, dim, length, generator=g),
        # Without softplus delta must be positive; with it, raw values of either sign.
        "delta": torch.randn(batch, dim, length, generator=g) if full else torch.rand(batch, dim, length, generator=g),
        "A": -(torch.rand(dim, state, generator=g) * 3 + 0.2),
        "B": torch.randn(bc_shape, generator=g),
        "C": torch.randn(bc_shape, generator=g),
    }
    if full:
        tensors["D"] = torch.randn(dim, generator=g)
        tensors["z"] = torch.randn(batch, dim, length, generator=g)
        tensors["delta_bias"] = torch.randn(dim, generator=g) * 0.5
    return {k: v.to(device).requires_grad_(True) for k, v in tensors.items()}


def _run(fn, tensors, full, **kwargs):
    out = fn(**tensors, delta_softplus=full, **kwargs)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.device)
    names = list(tensors)
    grads = torch.autograd.grad((out * weights).sum(), [tensors[k] for k in names])
    return out, dict(zip(names, grads))


def _assert_close(actual, expected, what):
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * max(scale, 1.0), msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend,device", FAST_BACKENDS, ids=IDS)
def test_backend_matches_reference_forward_and_backward(backend, device, case):
    batch, dim, state, length, groups, full = CASES[case]
    reference_inputs = _inputs(batch, dim, state, length, groups, full)
    expected, expected_grads = _run(selective_scan_ref, reference_inputs, full)
    inputs = _inputs(batch, dim, state, length, groups, full, device=device)
    kwargs = {"chunk_size": 8} if backend == "chunked" else {}
    if backend == "triton":
        from langmamba.ops.selective_scan_triton import selective_scan_triton

        out, grads = _run(selective_scan_triton, inputs, full, block_l=16)  # several blocks: carries tested
    elif kwargs:
        out, grads = _run(selective_scan_chunked, inputs, full, **kwargs)
    else:
        out, grads = _run(selective_scan, inputs, full, backend=backend)
    assert out.shape == (batch, dim, length) and out.dtype == torch.float32
    _assert_close(out, expected, f"{backend} forward")
    for name in expected_grads:
        _assert_close(grads[name], expected_grads[name], f"{backend} d{name}")


@pytest.mark.parametrize("backend,device", FAST_BACKENDS, ids=IDS)
def test_dispatch_through_public_function(backend, device):
    inputs = _inputs(1, 4, 4, 21, 2, True, seed=3, device=device)
    with torch.no_grad():
        expected = selective_scan(**{k: v.cpu() for k, v in inputs.items()}, delta_softplus=True, backend="reference")
        out = selective_scan(**inputs, delta_softplus=True, backend=backend)
    _assert_close(out, expected, backend)


@pytest.mark.parametrize("length,chunk", [(37, 8), (37, 37), (37, 100), (64, 16), (1, 4), (50, None)])
def test_chunked_any_length_and_chunk_size(length, chunk):
    inputs = _inputs(2, 4, 4, length, None, True, seed=length)
    expected, expected_grads = _run(selective_scan_ref, inputs, True)
    out, grads = _run(selective_scan_chunked, inputs, True, chunk_size=chunk)
    _assert_close(out, expected, f"chunked L={length} T={chunk}")
    for name in expected_grads:
        _assert_close(grads[name], expected_grads[name], f"chunked d{name} L={length} T={chunk}")


def test_chunked_no_grad_path_equals_autograd_path():
    inputs = _inputs(2, 6, 4, 45, 3, True, seed=11)
    with_grad = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=7)
    with torch.no_grad():
        in_place = selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=7)
    torch.testing.assert_close(in_place, with_grad.detach(), rtol=1e-6, atol=1e-6)


def test_chunked_is_stable_with_strong_decay_over_a_long_sequence():
    # Cumulative log-decay reaches about -2e4 over the sequence (up to -60 per token): a formulation
    # with exp(-cumsum) would overflow; the chunked passes only ever multiply decays <= 1.
    g = torch.Generator().manual_seed(5)
    batch, dim, state, length = 1, 3, 4, 600
    u = torch.randn(batch, dim, length, generator=g)
    delta = torch.rand(batch, dim, length, generator=g) * 3.0
    A = -torch.tensor([[1.0, 5.0, 10.0, 20.0]]).repeat(dim, 1)
    B = torch.randn(batch, state, length, generator=g)
    C = torch.randn(batch, state, length, generator=g)
    expected = selective_scan_ref(u, delta, A, B, C)
    out = selective_scan_chunked(u, delta, A, B, C, chunk_size=64)
    assert torch.isfinite(out).all()
    _assert_close(out, expected, "strong decay")


def test_default_chunk_size_grows_sublinearly():
    assert default_chunk_size(1) >= 1
    for length in (64, 4096, 65536):
        size = default_chunk_size(length)
        assert 1 <= size <= length
        assert size <= 4 * math.sqrt(length)


def test_output_dtype_follows_u():
    inputs = {k: v.detach() for k, v in _inputs(1, 4, 4, 16, None, True, seed=2).items()}
    half = {k: (v.to(torch.bfloat16) if k in ("u", "delta", "z", "B", "C") else v) for k, v in inputs.items()}
    out = selective_scan(**half, delta_softplus=True, backend="chunked")
    assert out.dtype == torch.bfloat16
    expected = selective_scan_ref(**half, delta_softplus=True)
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_auto_backend_on_cpu_is_chunked_and_listing_is_consistent():
    assert resolve_backend("auto", "cpu") == "chunked"
    names = available_backends()
    assert {"chunked", "reference"} <= set(names) and set(names) <= set(BACKENDS)
    assert ("triton" in names) == HAS_TRITON
    if HAS_CUDA:
        assert resolve_backend("auto", "cuda") == next(n for n in names if n in ("mamba_ssm", "triton", "chunked"))


def test_unknown_or_unusable_backend_raises(monkeypatch):
    inputs = {k: v.detach() for k, v in _inputs(1, 4, 4, 8, None, False).items()}
    with pytest.raises(ConfigError, match="unknown selective-scan backend 'cuda_magic'"):
        selective_scan(**inputs, backend="cuda_magic")
    with pytest.raises(ConfigError, match="mamba_ssm"):
        resolve_backend("mamba_ssm", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="triton"):
        resolve_backend("triton", "cpu")


def test_shape_errors_name_the_argument():
    inputs = {k: v.detach() for k, v in _inputs(2, 4, 3, 10, None, True).items()}
    bad = dict(inputs, B=inputs["B"][:, :, :9])
    with pytest.raises(InputError, match="B must be"):
        selective_scan(**bad, backend="chunked")
    bad = dict(inputs, A=inputs["A"][:3])
    with pytest.raises(InputError, match="A must be"):
        selective_scan_ref(**bad)
    bad = dict(inputs, D=torch.ones(5))
    with pytest.raises(InputError, match="D must have shape"):
        selective_scan_chunked(**bad)
    grouped = torch.randn(2, 3, 3, 10)
    with pytest.raises(InputError, match="cannot be split into 3"):
        selective_scan_chunked(**dict(inputs, B=grouped, C=grouped))
