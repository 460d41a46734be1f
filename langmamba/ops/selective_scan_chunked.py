"""Chunked selective scan: the CPU fast path (same conventions as :mod:`selective_scan_ref`).

The sequence of ``L`` tokens is cut into ``n = ceil(L / T)`` chunks of ``T`` tokens. Instead of a
Python loop over the ``L`` tokens, the recurrence runs in three vectorised passes:

1. local scan: the ``j``-th tokens of *all* chunks are advanced together (``T`` steps on tensors of
   ``batch·D·n·N`` elements), each chunk starting from a zero state; this gives every token's local
   output and each chunk's final local state;
2. carry: the true state entering each chunk, ``h_in[c] = P[c-1] h_in[c-1] + h_local_end[c-1]`` with
   ``P[c] = exp(A · sum of delta over chunk c)`` (``n`` small steps on ``batch·D·N`` elements);
3. correction: the entering state decays through the chunk, ``exp(A · cumsum delta) h_in[c]``, and its
   read-out ``C · (...)`` is added to each token's output (``T`` steps again).

Every factor is a decay ``exp(delta · A) <= 1`` applied to a bounded state: no exponential of a
positive number is ever formed, so the scan is as stable as the sequential one. Working memory is
``O(batch · D · N · L / T)`` plus the inputs; the default ``T ~ sqrt(L)`` balances the ``2T + n``
Python steps. Without autograd the passes update buffers in place; with autograd every op is
out-of-place, so gradients flow through plain PyTorch (the backward then stores one state per token).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from langmamba.errors import InputError
from langmamba.ops.selective_scan_ref import as_grouped, check_scan_inputs, discretization_step, finish_output


def default_chunk_size(length: int) -> int:
    """Chunk length ``T`` for ``length`` tokens: about ``sqrt(length / 2)``, at least 4.

    With ``T`` token steps in passes 1 and 3 and ``L / T`` carry steps, the number of Python steps
    ``2T + L/T`` is smallest at ``T = sqrt(L / 2)``.
    """
    return max(4, int(round(math.sqrt(max(length, 1) / 2.0))))


def _to_chunks(x: torch.Tensor, chunks: int, size: int, k_last: bool = False) -> torch.Tensor:
    """``(batch, G, K, chunks * size)`` -> ``(size, batch, G, K, chunks)`` (position in chunk first),
    or ``(size, batch, G, chunks, K)`` with ``k_last``."""
    batch, groups, k, _ = x.shape
    order = (4, 0, 1, 3, 2) if k_last else (4, 0, 1, 2, 3)
    return x.view(batch, groups, k, chunks, size).permute(order).contiguous()


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Selective scan by chunks; returns ``(batch, D, L)`` in ``u``'s dtype (fp32 arithmetic).

    Args: as :func:`langmamba.ops.selective_scan_ref.selective_scan_ref`, plus ``chunk_size``
    (tokens per chunk ``T``; default :func:`default_chunk_size`). ``L`` need not be a multiple of
    ``T``: the tail is padded with ``delta = 0`` (decay 1, no input), which leaves the state unchanged.
    """
    groups = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    state = A.shape[1]
    per_group = dim // groups
    size = default_chunk_size(length) if chunk_size is None else int(chunk_size)
    if size < 1:
        raise InputError(f"selective_scan_chunked: chunk_size must be positive, got {chunk_size}")
    if length == 0:
        return finish_output(u.new_zeros(u.shape, dtype=torch.float32), u, D, z, u.dtype)
    size = min(size, length)
    chunks = -(-length // size)
    pad = chunks * size - length

    step = discretization_step(delta, delta_bias, delta_softplus)
    drive = step * u.float()
    B_g = as_grouped(B).float().expand(batch, groups, state, length)
    C_g = as_grouped(C).float().expand(batch, groups, state, length)
    if pad:
        step, drive, B_g, C_g = (F.pad(t, (0, pad)) for t in (step, drive, B_g, C_g))
    step_j = _to_chunks(step.view(batch, groups, per_group, -1), chunks, size)  # (T, batch, G, Dg, n)
    drive_j = _to_chunks(drive.view(batch, groups, per_group, -1), chunks, size)
    # (T, batch, G, 1, n, N): N last so each step's read-out is a contiguous reduction.
    B_j = _to_chunks(B_g, chunks, size, k_last=True).unsqueeze(3)
    C_j = _to_chunks(C_g, chunks, size, k_last=True).unsqueeze(3)
    A_g = A.float().view(groups, per_group, 1, state)

    track = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (u, delta, A, B, C, delta_bias))
    scan = _scan_autograd if track else _scan_inplace
    y = scan(step_j, drive_j, B_j, C_j, A_g)  # (T, batch, G, Dg, n)
    y = y.permute(1, 2, 3, 4, 0).reshape(batch, dim, chunks * size)[..., :length]
    return finish_output(y, u, D, z, u.dtype)


def _chunk_entry_states(local_end: torch.Tensor, step_j: torch.Tensor, A_g: torch.Tensor) -> torch.Tensor:
    """Pass 2: state entering each chunk ``(batch, G, Dg, n, N)`` from the chunks' local end states."""
    chunks = local_end.shape[3]
    through = torch.exp(step_j.sum(0).unsqueeze(-1) * A_g)  # decay across each whole chunk
    entries = [torch.zeros_like(local_end[..., 0, :])]
    for c in range(chunks - 1):
        entries.append(torch.addcmul(local_end[..., c, :], through[..., c, :], entries[-1]))
    return torch.stack(entries, dim=3)


def _scan_inplace(
    step_j: torch.Tensor, drive_j: torch.Tensor, B_j: torch.Tensor, C_j: torch.Tensor, A_g: torch.Tensor
) -> torch.Tensor:
    """The three passes with preallocated buffers (no autograd); ``(T, batch, G, Dg, n)`` outputs."""
    size = step_j.shape[0]
    shape = step_j.shape[1:] + (A_g.shape[-1],)
    h = step_j.new_zeros(shape)
    decay = torch.empty_like(h)
    product = torch.empty_like(h)
    y = torch.empty_like(step_j)
    for j in range(size):
        torch.mul(step_j[j].unsqueeze(-1), A_g, out=decay).exp_()
        h.mul_(decay).addcmul_(drive_j[j].unsqueeze(-1), B_j[j])
        torch.mul(h, C_j[j], out=product)
        torch.sum(product, dim=-1, out=y[j])
    if step_j.shape[-1] == 1:
        return y
    h = _chunk_entry_states(h, step_j, A_g)
    for j in range(size):
        torch.mul(step_j[j].unsqueeze(-1), A_g, out=decay).exp_()
        h.mul_(decay)
        torch.mul(h, C_j[j], out=product)
        y[j].add_(product.sum(-1))
    return y


def _scan_autograd(
    step_j: torch.Tensor, drive_j: torch.Tensor, B_j: torch.Tensor, C_j: torch.Tensor, A_g: torch.Tensor
) -> torch.Tensor:
    """The same three passes, out-of-place so autograd can differentiate them."""
    size = step_j.shape[0]
    h = step_j.new_zeros(step_j.shape[1:] + (A_g.shape[-1],))
    ys = []
    for j in range(size):
        h = torch.addcmul(h * torch.exp(step_j[j].unsqueeze(-1) * A_g), drive_j[j].unsqueeze(-1), B_j[j])
        ys.append((h * C_j[j]).sum(-1))
    if step_j.shape[-1] > 1:
        h = _chunk_entry_states(h, step_j, A_g)
        for j in range(size):
            h = h * torch.exp(step_j[j].unsqueeze(-1) * A_g)
            ys[j] = ys[j] + (h * C_j[j]).sum(-1)
    return torch.stack(ys, dim=0)
