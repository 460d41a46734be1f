"""Plain PyTorch selective scan: the sequential recurrence every faster backend is tested against.

Conventions are those of mamba-ssm's ``selective_scan_fn`` (Gu & Dao 2023, real ``A``):

- ``u, delta, z``: ``(batch, D, L)``; ``A``: ``(D, N)``; ``B, C``: ``(batch, N, L)`` or grouped
  ``(batch, G, N, L)`` where channel ``d`` uses group ``d // (D / G)``; ``D``, ``delta_bias``: ``(D,)``.
- ``delta <- softplus(delta + delta_bias)`` (bias and softplus optional), then per channel ``d`` and
  state ``n``: ``h_t = exp(delta_t A[d, n]) h_{t-1} + delta_t B_t[n] u_t``, ``y_t = sum_n C_t[n] h_t[n]
  + D[d] u_t``, and ``y <- y * silu(z)`` when ``z`` is given. The output has ``u``'s dtype; the
  arithmetic is fp32.

This module also holds the shape checks and preprocessing shared by the backends.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from langmamba.errors import InputError


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> int:
    """Validate shapes against mamba-ssm's conventions; returns the number of B/C groups ``G``.

    Raises:
        InputError: a tensor has the wrong rank or a size that disagrees with ``u`` or ``A``.
    """
    if u.ndim != 3:
        raise InputError(f"selective_scan: u must be (batch, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if delta.shape != u.shape:
        raise InputError(f"selective_scan: delta has shape {tuple(delta.shape)}, expected {tuple(u.shape)}")
    if z is not None and z.shape != u.shape:
        raise InputError(f"selective_scan: z has shape {tuple(z.shape)}, expected {tuple(u.shape)}")
    if A.ndim != 2 or A.shape[0] != dim:
        raise InputError(f"selective_scan: A must be (D={dim}, N), got shape {tuple(A.shape)}")
    if A.is_complex():
        raise InputError("selective_scan: complex A is not supported; pass a real (D, N) tensor")
    state = A.shape[1]
    groups = 1
    for name, t in (("B", B), ("C", C)):
        if t.ndim == 3 and t.shape == (batch, state, length):
            continue
        if t.ndim == 4 and t.shape[0] == batch and t.shape[2:] == (state, length):
            groups = t.shape[1]
            continue
        raise InputError(
            f"selective_scan: {name} must be (batch, N, L) = ({batch}, {state}, {length}) or (batch, G, N, L), "
            f"got shape {tuple(t.shape)}"
        )
    if B.ndim == 4 and C.ndim == 4 and B.shape[1] != C.shape[1]:
        raise InputError(f"selective_scan: B has {B.shape[1]} groups but C has {C.shape[1]}")
    if dim % groups:
        raise InputError(f"selective_scan: D={dim} channels cannot be split into {groups} B/C groups")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and vector.shape != (dim,):
            raise InputError(f"selective_scan: {name} must have shape ({dim},), got {tuple(vector.shape)}")
    return groups


def as_grouped(x: torch.Tensor) -> torch.Tensor:
    """``(batch, N, L)`` -> ``(batch, 1, N, L)``; grouped ``(batch, G, N, L)`` is returned as is."""
    return x.unsqueeze(1) if x.ndim == 3 else x


def discretization_step(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """fp32 ``softplus(delta + delta_bias)`` (each part optional): the step size of the ZOH discretisation."""
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def finish_output(
    y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``(y + D u) * silu(z)`` in fp32, cast to ``dtype``; ``y, u, z``: ``(batch, D, L)``."""
    if D is not None:
        y = y + u.float() * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_ref(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Sequential selective scan (one step per token); ``(batch, D, L)`` in ``u``'s dtype.

    The ground truth for tests: slow (a Python loop over ``L``), so use it only at small ``L``.
    See the module docstring for shapes.
    """
    groups = check_scan_inputs(u, delta, A, B, C, D, z, delta_bias)
    batch, dim, length = u.shape
    state = A.shape[1]
    per_group = dim // groups
    step = discretization_step(delta, delta_bias, delta_softplus).view(batch, groups, per_group, length)
    drive = step * u.float().view(batch, groups, per_group, length)
    A_g = A.float().view(groups, per_group, state)
    B_g = as_grouped(B).float()
    C_g = as_grouped(C).float()
    if B_g.shape[1] != groups:
        B_g = B_g.expand(batch, groups, state, length)
    if C_g.shape[1] != groups:
        C_g = C_g.expand(batch, groups, state, length)
    h = u.new_zeros(batch, groups, per_group, state, dtype=torch.float32)
    ys = []
    for t in range(length):
        decay = torch.exp(step[..., t, None] * A_g)
        h = decay * h + drive[..., t, None] * B_g[:, :, None, :, t]
        ys.append((h * C_g[:, :, None, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(batch, dim, length)
    return finish_output(y, u, D, z, u.dtype)
