"""Selective scan as Triton kernels (forward and backward) for GPUs without mamba-ssm's CUDA extension.

Same conventions as :mod:`langmamba.ops.selective_scan_ref`. One program handles one ``(batch, channel)``
pair and walks the sequence in blocks of ``BLOCK_L`` tokens held as a ``(N, BLOCK_L)`` tile: within a
block the recurrence ``h_t = a_t h_{t-1} + x_t`` is a parallel associative scan of ``(a, x)`` pairs,
and the state is carried from block to block. All arithmetic is fp32 whatever the input dtype.

The backward pass re-runs the forward scan of each block from the block's entering state (saved by
the forward pass, ``batch · D · N · L / BLOCK_L`` floats), then scans the gradient of the state
backwards, ``g_t = C_t dy_t + a_{t+1} g_{t+1}``, as a forward scan of the flipped block. ``dB`` and
``dC`` are summed over the channels of a group with fp32 atomics, like mamba-ssm's kernel.

For tests without a GPU, the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set before
this module is imported).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from langmamba.errors import InputError
from langmamba.ops.selective_scan_ref import as_grouped, check_scan_inputs


@triton.jit
def _combine(a_left, x_left, a_right, x_right):
    # Composition of two affine maps h -> a h + x (left applied first).
    return a_left * a_right, a_right * x_left + x_right


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with a series for small exp(x), where log(1 + e) would lose the digits of e.
    e = tl.exp(tl.minimum(x, 20.0))
    series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - e * 0.25)))
    small = tl.where(e < 1e-2, series, tl.log(1.0 + e))
    return tl.where(x > 20.0, x, small)


@triton.jit
def _step(raw, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    if HAS_BIAS:
        raw = raw + bias
    if SOFTPLUS:
        raw = _softplus(raw)
    return raw


@triton.jit
def _fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    state_ptr,
    length,
    n_state,
    b_per_group,
    c_per_group,
    su_b,
    su_d,
    su_l,
    sdt_b,
    sdt_d,
    sdt_l,
    sA_d,
    sA_n,
    sB_b,
    sB_g,
    sB_n,
    sB_l,
    sC_b,
    sC_g,
    sC_n,
    sC_l,
    sz_b,
    sz_d,
    sz_l,
    so_b,
    so_d,
    so_l,
    ss_b,
    ss_d,
    ss_c,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    SAVE_STATE: tl.constexpr,
):
    d = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    pos = tl.arange(0, BLOCK_L)
    n_ok = n < n_state
    A2 = tl.load(A_ptr + d * sA_d + n * sA_n, mask=n_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D_ptr + d).to(tl.float32)
    u_row = u_ptr + b * su_b + d * su_d
    dt_row = delta_ptr + b * sdt_b + d * sdt_d
    out_row = out_ptr + b * so_b + d * so_d
    B_rows = B_ptr + b * sB_b + (d // b_per_group) * sB_g + n[:, None] * sB_n
    C_rows = C_ptr + b * sC_b + (d // c_per_group) * sC_g + n[:, None] * sC_n
    state_row = state_ptr + b * ss_b + d * ss_d
    h = tl.zeros([BLOCK_N], dtype=tl.float32)
    for block in range(0, tl.cdiv(length, BLOCK_L)):
        t = block * BLOCK_L + pos
        t_ok = t < length
        tile_ok = n_ok[:, None] & t_ok[None, :]
        u = tl.load(u_row + t * su_l, mask=t_ok, other=0.0).to(tl.float32)
        dt = _step(tl.load(dt_row + t * sdt_l, mask=t_ok, other=0.0).to(tl.float32), bias, HAS_BIAS, SOFTPLUS)
        dt = tl.where(t_ok, dt, 0.0)  # tokens past the end: decay 1, no input
        decay = tl.exp2(dt[None, :] * A2[:, None])
        Bv = tl.load(B_rows + t[None, :] * sB_l, mask=tile_ok, other=0.0).to(tl.float32)
        x = Bv * (dt * u)[None, :]
        if SAVE_STATE:
            tl.store(state_row + block * ss_c + n, h)
        a_scan, x_scan = tl.associative_scan((decay, x), axis=1, combine_fn=_combine)
        hs = x_scan + a_scan * h[:, None]
        Cv = tl.load(C_rows + t[None, :] * sC_l, mask=tile_ok, other=0.0).to(tl.float32)
        y = tl.sum(Cv * hs, axis=0)
        if HAS_D:
            y += skip * u
        if HAS_Z:
            zz = tl.load(z_ptr + b * sz_b + d * sz_d + t * sz_l, mask=t_ok, other=0.0).to(tl.float32)
            y = y * zz * tl.sigmoid(zz)
        tl.store(out_row + t * so_l, y.to(out_ptr.dtype.element_ty), mask=t_ok)
        h = tl.sum(tl.where(pos[None, :] == BLOCK_L - 1, hs, 0.0), axis=1)


@triton.jit
def _bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dout_ptr,
    state_ptr,
    du_ptr,
    ddelta_ptr,
    dA_ptr,
    dB_ptr,
    dC_ptr,
    dD_ptr,
    dz_ptr,
    dbias_ptr,
    length,
    n_state,
    b_per_group,
    c_per_group,
    su_b,
    su_d,
    su_l,
    sdt_b,
    sdt_d,
    sdt_l,
    sA_d,
    sA_n,
    sB_b,
    sB_g,
    sB_n,
    sB_l,
    sC_b,
    sC_g,
    sC_n,
    sC_l,
    sz_b,
    sz_d,
    sz_l,
    sg_b,
    sg_d,
    sg_l,
    ss_b,
    ss_d,
    ss_c,
    sdB_b,
    sdB_g,
    sdB_n,
    sdC_b,
    sdC_g,
    sdC_n,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
):
    # Gradient tensors du, ddelta, dz and dout share the strides sg_*; dB, dC are fp32 with unit L stride.
    d = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    n = tl.arange(0, BLOCK_N)
    pos = tl.arange(0, BLOCK_L)
    n_ok = n < n_state
    A = tl.load(A_ptr + d * sA_d + n * sA_n, mask=n_ok, other=0.0).to(tl.float32)
    A2 = A * 1.4426950408889634
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + d).to(tl.float32)
    skip = 0.0
    if HAS_D:
        skip = tl.load(D_ptr + d).to(tl.float32)
    u_row = u_ptr + b * su_b + d * su_d
    dt_row = delta_ptr + b * sdt_b + d * sdt_d
    grad_offset = b * sg_b + d * sg_d
    gb = d // b_per_group
    gc_ = d // c_per_group
    B_rows = B_ptr + b * sB_b + gb * sB_g + n[:, None] * sB_n
    C_rows = C_ptr + b * sC_b + gc_ * sC_g + n[:, None] * sC_n
    dB_rows = dB_ptr + b * sdB_b + gb * sdB_g + n[:, None] * sdB_n
    dC_rows = dC_ptr + b * sdC_b + gc_ * sdC_g + n[:, None] * sdC_n
    state_row = state_ptr + b * ss_b + d * ss_d

    g_next = tl.zeros([BLOCK_N], dtype=tl.float32)  # state gradient at the first token of the later block
    dA_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    dD_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    dbias_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    blocks = tl.cdiv(length, BLOCK_L)
    for i in range(0, blocks):
        block = blocks - 1 - i
        t = block * BLOCK_L + pos
        t_ok = t < length
        tile_ok = n_ok[:, None] & t_ok[None, :]
        u = tl.load(u_row + t * su_l, mask=t_ok, other=0.0).to(tl.float32)
        raw = tl.load(dt_row + t * sdt_l, mask=t_ok, other=0.0).to(tl.float32)
        dt = tl.where(t_ok, _step(raw, bias, HAS_BIAS, SOFTPLUS), 0.0)
        later_ok = (t + 1) < length
        raw_next = tl.load(dt_row + (t + 1) * sdt_l, mask=later_ok, other=0.0).to(tl.float32)
        dt_next = tl.where(later_ok, _step(raw_next, bias, HAS_BIAS, SOFTPLUS), 0.0)

        # Re-run the forward scan of this block from its saved entering state.
        decay = tl.exp2(dt[None, :] * A2[:, None])
        Bv = tl.load(B_rows + t[None, :] * sB_l, mask=tile_ok, other=0.0).to(tl.float32)
        Cv = tl.load(C_rows + t[None, :] * sC_l, mask=tile_ok, other=0.0).to(tl.float32)
        x = Bv * (dt * u)[None, :]
        h0 = tl.load(state_row + block * ss_c + n)
        a_scan, x_scan = tl.associative_scan((decay, x), axis=1, combine_fn=_combine)
        h = x_scan + a_scan * h0[:, None]

        dout = tl.load(dout_ptr + grad_offset + t * sg_l, mask=t_ok, other=0.0).to(tl.float32)
        if HAS_Z:
            zz = tl.load(z_ptr + b * sz_b + d * sz_d + t * sz_l, mask=t_ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(zz)
            y = tl.sum(Cv * h, axis=0)
            if HAS_D:
                y += skip * u
            dz = dout * y * sig * (1.0 + zz * (1.0 - sig))
            tl.store(dz_ptr + grad_offset + t * sg_l, dz.to(dz_ptr.dtype.element_ty), mask=t_ok)
            dy = dout * zz * sig
        else:
            dy = dout

        # g_t = C_t dy_t + a_{t+1} g_{t+1}: a forward scan over the flipped block.
        decay_next = tl.exp2(dt_next[None, :] * A2[:, None])
        r_scan, c_scan = tl.associative_scan(
            (tl.flip(decay_next, 1), tl.flip(Cv * dy[None, :], 1)), axis=1, combine_fn=_combine
        )
        g = tl.flip(c_scan + r_scan * g_next[:, None], 1)
        g_next = tl.sum(tl.where(pos[None, :] == 0, g, 0.0), axis=1)

        carried = h - x  # a_t h_{t-1}
        ddt = tl.sum(g * (Bv * u[None, :] + carried * A[:, None]), axis=0)
        dA_acc += tl.sum(g * carried * dt[None, :], axis=1)
        du = tl.sum(g * Bv, axis=0) * dt
        if HAS_D:
            du += skip * dy
            dD_acc += dy * u
        tl.atomic_add(dB_rows + t[None, :], g * (dt * u)[None, :], mask=tile_ok)
        tl.atomic_add(dC_rows + t[None, :], h * dy[None, :], mask=tile_ok)
        if SOFTPLUS:
            ddt = ddt * tl.sigmoid(raw + bias)
        ddt = tl.where(t_ok, ddt, 0.0)
        if HAS_BIAS:
            dbias_acc += ddt
        tl.store(du_ptr + grad_offset + t * sg_l, du.to(du_ptr.dtype.element_ty), mask=t_ok)
        tl.store(ddelta_ptr + grad_offset + t * sg_l, ddt.to(ddelta_ptr.dtype.element_ty), mask=t_ok)

    tl.atomic_add(dA_ptr + d * n_state + n, dA_acc, mask=n_ok)
    if HAS_D:
        tl.atomic_add(dD_ptr + d, tl.sum(dD_acc, axis=0))
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + d, tl.sum(dbias_acc, axis=0))


DEFAULT_BLOCK_L = 64
"""Tokens per block for long sequences (shorter ones use the next power of two, at least 16).

Measured on an H100 at the SS2D shapes of a 512² LangMamba forward (bf16, batch 32): 64 tokens with
4 warps took 0.28 ms per slice, 128 tokens with 8 warps 0.46 ms; the backward 2.3 against 4.6 ms."""

DEFAULT_NUM_WARPS = 4
"""Warps per program (fewer for blocks under 64 tokens)."""


def _block_sizes(length: int, state: int, block_l: int | None) -> tuple[int, int]:
    block_n = max(2, triton.next_power_of_2(state))
    if block_l is None:
        block_l = min(DEFAULT_BLOCK_L, max(16, triton.next_power_of_2(length)))
    if block_l < 2 or block_l & (block_l - 1):
        raise InputError(f"selective_scan_triton: block_l must be a power of two >= 2, got {block_l}")
    return block_n, block_l


def _warps(num_warps: int | None, block_l: int) -> int:
    # Small blocks do not need (and cannot fill) many warps.
    return num_warps if num_warps is not None else max(1, min(DEFAULT_NUM_WARPS, block_l // 16))


class _SelectiveScanFn(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        delta_softplus: bool,
        block_l: int | None,
        num_warps: int | None,
    ) -> torch.Tensor:
        batch, dim, length = u.shape
        state = A.shape[1]
        block_n, block_l = _block_sizes(length, state, block_l)
        blocks = triton.cdiv(length, block_l)
        save = any(ctx.needs_input_grad)
        out = torch.empty_like(u)
        states = u.new_empty((batch, dim, blocks, block_n) if save else (1, 1, 1, 1), dtype=torch.float32)
        _fwd_kernel[(dim, batch)](
            u,
            delta,
            A,
            B,
            C,
            D if D is not None else u,
            z if z is not None else u,
            delta_bias if delta_bias is not None else u,
            out,
            states,
            length,
            state,
            dim // B.shape[1],
            dim // C.shape[1],
            *u.stride(),
            *delta.stride(),
            *A.stride(),
            *B.stride(),
            *C.stride(),
            *(z.stride() if z is not None else (0, 0, 0)),
            *out.stride(),
            *states.stride()[:3],
            BLOCK_N=block_n,
            BLOCK_L=block_l,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=bool(delta_softplus),
            SAVE_STATE=save,
            num_warps=_warps(num_warps, block_l),
        )
        if save:
            ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
            ctx.delta_softplus = bool(delta_softplus)
            ctx.block_l = block_l
            ctx.num_warps = num_warps
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        batch, dim, length = u.shape
        state = A.shape[1]
        block_n, block_l = _block_sizes(length, state, ctx.block_l)
        dout = dout.contiguous()
        du = torch.empty_like(u, memory_format=torch.contiguous_format)
        ddelta = torch.empty_like(delta, memory_format=torch.contiguous_format)
        dz = torch.empty_like(z, memory_format=torch.contiguous_format) if z is not None else None
        dA = torch.zeros(dim, state, device=u.device, dtype=torch.float32)
        dB = torch.zeros(B.shape, device=u.device, dtype=torch.float32)
        dC = torch.zeros(C.shape, device=u.device, dtype=torch.float32)
        dD = torch.zeros(dim, device=u.device, dtype=torch.float32) if D is not None else None
        dbias = torch.zeros(dim, device=u.device, dtype=torch.float32) if delta_bias is not None else None
        _bwd_kernel[(dim, batch)](
            u,
            delta,
            A,
            B,
            C,
            D if D is not None else u,
            z if z is not None else u,
            delta_bias if delta_bias is not None else u,
            dout,
            states,
            du,
            ddelta,
            dA,
            dB,
            dC,
            dD if dD is not None else dA,
            dz if dz is not None else du,
            dbias if dbias is not None else dA,
            length,
            state,
            dim // B.shape[1],
            dim // C.shape[1],
            *u.stride(),
            *delta.stride(),
            *A.stride(),
            *B.stride(),
            *C.stride(),
            *(z.stride() if z is not None else (0, 0, 0)),
            *dout.stride(),
            *states.stride()[:3],
            *dB.stride()[:3],
            *dC.stride()[:3],
            BLOCK_N=block_n,
            BLOCK_L=block_l,
            HAS_D=D is not None,
            HAS_Z=z is not None,
            HAS_BIAS=delta_bias is not None,
            SOFTPLUS=ctx.delta_softplus,
            num_warps=_warps(ctx.num_warps, block_l),
        )
        return (
            du,
            ddelta,
            dA.to(A.dtype),
            dB.to(B.dtype),
            dC.to(C.dtype),
            dD.to(D.dtype) if dD is not None else None,
            dz,
            dbias.to(delta_bias.dtype) if dbias is not None else None,
            None,
            None,
            None,
        )


# torch.compile must not trace into the kernel launch (its grid and warps come from tensor shapes);
# a compiled model calls the scan as an opaque op between compiled regions.
@torch.compiler.disable
def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    block_l: int | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """Selective scan by Triton kernels; ``(batch, D, L)`` in ``u``'s dtype, differentiable.

    Args: as :func:`langmamba.ops.selective_scan_ref.selective_scan_ref`, plus ``block_l`` (tokens per
    program step, a power of two; default :data:`DEFAULT_BLOCK_L`, or ``next_power_of_2(L)`` (at least
    16) for shorter sequences) and ``num_warps`` (default :data:`DEFAULT_NUM_WARPS`, fewer for small
    blocks). Tensors must be on a CUDA device, or on the CPU under ``TRITON_INTERPRET=1``.
    """
    check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    # as_grouped is a view, so autograd maps the (batch, 1, N, L) gradient back to (batch, N, L).
    out: torch.Tensor = _SelectiveScanFn.apply(
        u, delta, A, as_grouped(B), as_grouped(C), D, z, delta_bias, delta_softplus, block_l, num_warps
    )
    return out
