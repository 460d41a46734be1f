"""VQGAN building blocks (Esser et al. 2021): residual, self-attention, down- and upsampling.

All blocks take and return ``(B, C, H, W)`` feature maps; only the channel count and, for the
resampling blocks, the spatial size change.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def group_count(channels: int, max_groups: int = 32) -> int:
    """Number of GroupNorm groups: 32 as in VQGAN, or the largest divisor of ``channels`` below it.

    The fallback lets narrow test/debug configurations (e.g. 8 or 24 channels) use the same blocks.
    """
    return math.gcd(channels, max_groups)


def normalization(channels: int) -> nn.GroupNorm:
    """VQGAN's GroupNorm (eps 1e-6, affine)."""
    return nn.GroupNorm(group_count(channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: (GroupNorm, SiLU, 3×3 conv) × 2 plus a 1×1 shortcut if C changes.

    ``(B, in_channels, H, W) -> (B, out_channels, H, W)``.
    """

    def __init__(self, in_channels: int, out_channels: int | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = normalization(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = normalization(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        out: torch.Tensor = self.shortcut(x) + h
        return out


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all H·W positions with a residual connection.

    ``(B, C, H, W) -> (B, C, H, W)``; cost grows with (H·W)², so VQGAN places it at low resolution.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = normalization(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C): one head; SDPA picks a memory-efficient kernel where available.
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(-1, -2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        result: torch.Tensor = x + self.proj_out(out)
        return result


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3×3 conv after VQGAN's asymmetric (right/bottom) zero pad.

    ``(B, C, H, W) -> (B, C, H/2, W/2)`` for even H, W.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(F.pad(x, (0, 1, 0, 1)))
        return out


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling then a 3×3 conv. ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return out


class MidBlock(nn.Module):
    """VQGAN's bottleneck: residual block, self-attention, residual block (C unchanged)."""

    def __init__(self, channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.block_2(self.attn_1(self.block_1(x)))
        return out
