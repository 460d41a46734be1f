"""SS2D: the 2-D selective scan block of VMamba with EfficientVMamba's strided (skip-sampled) scan.

With ``step=2`` the feature map is split into the 4 interleaved sub-grids of stride 2 and each sub-grid
is scanned in one direction (row-major, column-major, and their reverses), so the 4 sequences together
hold every pixel once (EfficientVMamba's ES2D): a quarter of the tokens of VMamba's 4-direction scan of
the full grid. The outputs are written back to their sub-grids (:func:`cross_merge` exactly inverts
:func:`cross_scan`). ``step=1`` is VMamba's original cross-scan: the 4 directions over the full grid,
summed on merge.

Layout: ``(B, C, H, W)`` in and out (channels first, like the conv blocks around it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from langmamba.errors import ConfigError, InputError
from langmamba.ops import selective_scan

DIRECTIONS = 4
"""Scan directions: row-major, column-major, reversed row-major, reversed column-major."""


def cross_scan(x: torch.Tensor, step: int = 2) -> torch.Tensor:
    """Unfold ``x (B, C, H, W)`` into 4 directional sequences ``(B, 4, C, L)``.

    ``step=2`` (H, W even): sub-grid ``(r, c)`` holds pixels ``x[..., r::2, c::2]``; sequence 0 scans
    sub-grid (0, 0) row-major, 1 scans (1, 0) column-major, 2 scans (0, 1) row-major reversed and 3
    scans (1, 1) column-major reversed; ``L = H W / 4``. ``step=1``: the 4 directions over the whole
    grid, ``L = H W``.
    """
    if x.ndim != 4:
        raise InputError(f"cross_scan expects (B, C, H, W), got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if step == 1:
        rows = x.flatten(2)
        cols = x.transpose(2, 3).flatten(2)
        return torch.stack([rows, cols, rows.flip(-1), cols.flip(-1)], dim=1)
    if step != 2:
        raise ConfigError(f"cross_scan supports step 1 or 2, got {step}")
    if h % 2 or w % 2:
        raise InputError(f"cross_scan with step 2 needs even H and W, got {h}×{w}")
    grid = x.view(b, c, h // 2, 2, w // 2, 2)
    return torch.stack(
        [
            grid[:, :, :, 0, :, 0].flatten(2),
            grid[:, :, :, 1, :, 0].transpose(2, 3).flatten(2),
            grid[:, :, :, 0, :, 1].flatten(2).flip(-1),
            grid[:, :, :, 1, :, 1].transpose(2, 3).flatten(2).flip(-1),
        ],
        dim=1,
    )


def cross_merge(ys: torch.Tensor, height: int, width: int, step: int = 2) -> torch.Tensor:
    """Fold 4 directional sequences ``(B, 4, C, L)`` back to ``(B, C, H, W)``.

    ``step=2``: the exact inverse of :func:`cross_scan` (each pixel comes from the one sequence that
    holds it). ``step=1``: the sum of the 4 directions at each pixel, as in VMamba.
    """
    b, k, c, length = ys.shape
    if k != DIRECTIONS:
        raise InputError(f"cross_merge expects {DIRECTIONS} directions, got {k}")
    if step == 1:
        if length != height * width:
            raise InputError(f"cross_merge: L={length} does not match {height}×{width}")
        rows = ys[:, 0] + ys[:, 2].flip(-1)
        cols = ys[:, 1] + ys[:, 3].flip(-1)
        return rows.view(b, c, height, width) + cols.view(b, c, width, height).transpose(2, 3)
    if step != 2:
        raise ConfigError(f"cross_merge supports step 1 or 2, got {step}")
    h2, w2 = height // 2, width // 2
    if height % 2 or width % 2 or length != h2 * w2:
        raise InputError(f"cross_merge: L={length} does not match the stride-2 sub-grids of {height}×{width}")
    g00 = ys[:, 0].view(b, c, h2, w2)
    g10 = ys[:, 1].view(b, c, w2, h2).transpose(2, 3)
    g01 = ys[:, 2].flip(-1).view(b, c, h2, w2)
    g11 = ys[:, 3].flip(-1).view(b, c, w2, h2).transpose(2, 3)
    # (B, C, H/2, W/2, r, c) -> (B, C, H/2, r, W/2, c) -> (B, C, H, W)
    grid = torch.stack([torch.stack([g00, g01], dim=-1), torch.stack([g10, g11], dim=-1)], dim=-2)
    return grid.permute(0, 1, 2, 4, 3, 5).reshape(b, c, height, width)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of each pixel of ``(B, C, H, W)`` (fp32 statistics under autocast)."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return out


class SS2D(nn.Module):
    """2-D selective-scan mixer: ``(B, d_model, H, W) -> (B, d_model, H, W)``, any ``H, W``.

    in-projection to ``x, z`` (``d_inner = expand · d_model`` each), depthwise conv + SiLU on ``x``,
    4-directional (strided) scan with per-direction ``x_proj``/``dt_proj`` as in VMamba, LayerNorm,
    SiLU gate ``z`` and out-projection. Odd ``H`` or ``W`` are zero-padded to even for ``step=2`` and
    cropped back.

    Args:
        d_model: input/output channels.
        d_state: SSM state size ``N`` per channel.
        expand: ``d_inner / d_model``.
        dt_rank: rank of the step-size projection; ``None`` = ``ceil(d_model / 16)``.
        d_conv: depthwise conv kernel size (odd).
        step: 2 for EfficientVMamba's skip-sampled scan, 1 for VMamba's full cross-scan.
        dt_min: smallest initial step size.
        dt_max: largest initial step size.
        dt_init_floor: lower clamp of the initial step sizes.
        scan_backend: selective-scan backend (see :func:`langmamba.ops.selective_scan`).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: float = 2.0,
        dt_rank: int | None = None,
        d_conv: int = 3,
        step: int = 2,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        if step not in (1, 2):
            raise ConfigError(f"SS2D step must be 1 or 2, got {step}")
        if d_conv < 1 or d_conv % 2 == 0:
            raise ConfigError(f"SS2D d_conv must be a positive odd kernel size, got {d_conv}")
        if d_model < 1 or d_state < 1 or expand <= 0:
            raise ConfigError("SS2D d_model, d_state and expand must be positive")
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = d_inner = max(1, int(round(expand * d_model)))
        self.dt_rank = dt_rank = math.ceil(d_model / 16) if dt_rank is None else int(dt_rank)
        self.step = step
        self.scan_backend = scan_backend

        self.in_proj = nn.Conv2d(d_model, 2 * d_inner, kernel_size=1, bias=False)
        self.conv2d = nn.Conv2d(d_inner, d_inner, d_conv, padding=d_conv // 2, groups=d_inner)
        bound = d_inner**-0.5
        self.x_proj_weight = nn.Parameter(
            torch.empty(DIRECTIONS, dt_rank + 2 * d_state, d_inner).uniform_(-bound, bound)
        )
        self.dt_projs_weight = nn.Parameter(
            torch.empty(DIRECTIONS, d_inner, dt_rank).uniform_(-(dt_rank**-0.5), dt_rank**-0.5)
        )
        # Initial step sizes log-uniform in [dt_min, dt_max]; the bias is their inverse softplus.
        dt = torch.exp(torch.rand(DIRECTIONS, d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_projs_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real initialisation A = -(1..N) for every channel and direction.
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(DIRECTIONS * d_inner, 1)
        self.A_logs = nn.Parameter(torch.log(A))
        self.Ds = nn.Parameter(torch.ones(DIRECTIONS * d_inner))
        self.out_norm = LayerNorm2d(d_inner)
        self.out_proj = nn.Conv2d(d_inner, d_model, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.d_model:
            raise InputError(f"SS2D expects (B, {self.d_model}, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        xs, z = self.in_proj(x).chunk(2, dim=1)
        xs = F.silu(self.conv2d(xs))
        pad_h, pad_w = (height % 2, width % 2) if self.step == 2 else (0, 0)
        if pad_h or pad_w:
            xs = F.pad(xs, (0, pad_w, 0, pad_h))
        y = self._scan(xs)[..., :height, :width]
        y = self.out_norm(y) * F.silu(z)
        out: torch.Tensor = self.out_proj(y)
        return out

    def _scan(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, d_inner, H, W) -> (B, d_inner, H, W)`` through the 4 directional selective scans."""
        b, d, height, width = x.shape
        seqs = cross_scan(x, self.step)  # (B, K, d, L)
        length = seqs.shape[-1]
        proj = torch.einsum("bkdl,kcd->bkcl", seqs, self.x_proj_weight.to(seqs.dtype))
        dts, Bs, Cs = torch.split(proj, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight.to(dts.dtype))
        ys = selective_scan(
            seqs.reshape(b, DIRECTIONS * d, length),
            dts.reshape(b, DIRECTIONS * d, length),
            -torch.exp(self.A_logs.float()),
            Bs.contiguous(),
            Cs.contiguous(),
            D=self.Ds.float(),
            delta_bias=self.dt_projs_bias.float().view(-1),
            delta_softplus=True,
            backend=self.scan_backend,
        )
        return cross_merge(ys.view(b, DIRECTIONS, d, length), height, width, self.step)
