"""LangMamba's stage-2 denoiser: a Mamba U-decoder on the frozen LangAE encoder's feature pyramid.

The paper calls the decoder SEED. Starting from the deepest LangAE feature (``H/16``), each level runs
decoder blocks (SS2D selective-scan
mixer, conv block with channel attention and a spatial attention gate, conv feed-forward), then
upsamples ×2 and fuses the LangAE encoder feature of the next finer level, up to full resolution,
where a 3×3 conv gives the 1-channel output. The full- and half-resolution levels are conv-only and
narrow (an SS2D there would scan 65,536 / 16,384 tokens per direction for little gain). The default
widths (16, 32, 48, 96, 128), depths (1, 1, 1, 2, 2) and SS2D state size 8 were chosen against the
speed targets (``python -m langmamba.bench.model``): on an H100 with bf16 autocast and batches of 64
512² slices, LangMamba ran 338 slices/s (with depths (1, 1, 2, 2, 2): 307 at state 8, 296 at state
16); on 2 CPU cores in fp32 a 512² slice takes about a second.

:class:`LangMamba` couples a frozen LangAE (never trained here, always in eval mode) with a trainable
:class:`DenoiserDecoder`; images are ``(B, 1, H, W)`` in model range (see :mod:`langmamba.normalization`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from langmamba.errors import ConfigError, InputError
from langmamba.models.config import DECODER_PRESETS, LEVELS, DecoderConfig, LangAEConfig, LangMambaConfig
from langmamba.models.langae import LangAE
from langmamba.models.registry import register_model
from langmamba.models.ss2d import SS2D, LayerNorm2d

__all__ = ["DECODER_PRESETS", "LEVELS", "DecoderConfig", "DenoiserBlock", "DenoiserDecoder", "LangMamba"]


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: per-channel weights from the global average. ``(B, C, H, W)`` in and out."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(4, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * weights


class SpatialAttentionGate(nn.Module):
    """CBAM spatial gate: a sigmoid map from the channel mean and max, multiplied onto ``x (B, C, H, W)``."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class ConvAttentionBlock(nn.Module):
    """3×3 conv, GELU, 3×3 conv (through ``hidden`` channels), channel attention, spatial gate.

    ``(B, C, H, W) -> (B, C, H, W)``; used as a residual branch.
    """

    def __init__(self, channels: int, hidden: int, reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)
        self.channel_attention = ChannelAttention(channels, reduction)
        self.spatial_gate = SpatialAttentionGate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.spatial_gate(self.channel_attention(self.conv2(F.gelu(self.conv1(x)))))
        return out


class ConvFeedForward(nn.Module):
    """1×1 expand, depthwise 3×3, GELU, 1×1 project. ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, ratio: float = 2.0) -> None:
        super().__init__()
        hidden = max(1, int(round(channels * ratio)))
        self.expand = nn.Conv2d(channels, hidden, kernel_size=1)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.project(F.gelu(self.depthwise(self.expand(x))))
        return out


class DenoiserBlock(nn.Module):
    """One decoder block (the paper's SEED block) on ``(B, C, H, W)``: ``x + SS2D(LN x)`` (if ``use_ssm``),
    ``+ ConvAttention(x)``, ``+ FFN(LN x)``. Conv-only blocks (``use_ssm=False``) skip the SS2D and the norms.

    Args:
        channels: C.
        use_ssm: include the SS2D mixer.
        d_state: SS2D state size.
        expand: SS2D ``d_inner / C``.
        step: SS2D scan stride (2 = EfficientVMamba's skip-sampled scan).
        ffn_ratio: hidden width of the feed-forward as a multiple of C.
        cab_ratio: hidden width of the conv attention block as a fraction of C.
        scan_backend: selective-scan backend of the SS2D.
    """

    def __init__(
        self,
        channels: int,
        use_ssm: bool = True,
        d_state: int = 16,
        expand: float = 2.0,
        step: int = 2,
        ffn_ratio: float = 2.0,
        cab_ratio: float = 0.5,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        self.use_ssm = use_ssm
        if use_ssm:
            self.norm_ssm = LayerNorm2d(channels)
            self.ssm = SS2D(channels, d_state=d_state, expand=expand, step=step, scan_backend=scan_backend)
        self.cab = ConvAttentionBlock(channels, max(4, int(round(channels * cab_ratio))))
        self.norm_ffn = LayerNorm2d(channels) if use_ssm else nn.Identity()
        self.ffn = ConvFeedForward(channels, ffn_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_ssm:
            x = x + self.ssm(self.norm_ssm(x))
        x = x + self.cab(x)
        out: torch.Tensor = x + self.ffn(self.norm_ffn(x))
        return out


class DenoiserDecoder(nn.Module):
    """Trainable U-decoder: LangAE features ``[(B, F_i, H/2^i, W/2^i)]_{i<5}`` -> ``(B, 1, H, W)``.

    Level ``i`` works at width ``widths[i]`` with ``depths[i]`` :class:`DenoiserBlock` (SS2D where
    ``ssm_levels[i]``). From the deepest level up: 1×1 projection of the LangAE feature, blocks, then
    for each finer level a 1×1 conv and bilinear ×2 upsampling, concatenation with that level's LangAE
    feature, a 1×1 fusion conv, blocks; a 3×3 head gives the output.

    Args:
        feature_channels: channels ``F_i`` of the 5 LangAE feature maps (``LangAE.feature_channels``).
        config: the decoder's architecture (default: :class:`DecoderConfig`'s, the ``"fast"`` preset);
            keyword arguments named like its fields override single values.
        out_channels: output channels (1 for CT).
        scan_backend: selective-scan backend of every SS2D (a run-time choice, not part of the config).
    """

    def __init__(
        self,
        feature_channels: Sequence[int] = (64, 64, 128, 128, 256),
        config: DecoderConfig | None = None,
        *,
        out_channels: int = 1,
        scan_backend: str = "auto",
        **overrides: Any,
    ) -> None:
        super().__init__()
        config = (config or DecoderConfig()).replace(**overrides)
        if len(feature_channels) != LEVELS:
            raise ConfigError(
                f"DenoiserDecoder feature_channels must have {LEVELS} entries (H ... H/16), got {len(feature_channels)}"
            )
        self.config = config
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.global_residual = config.global_residual
        widths = config.widths

        def blocks(level: int) -> nn.Sequential:
            return nn.Sequential(
                *(
                    DenoiserBlock(
                        widths[level],
                        use_ssm=bool(config.ssm_levels[level]),
                        d_state=config.d_state,
                        expand=config.expand,
                        step=config.step,
                        ffn_ratio=config.ffn_ratio,
                        scan_backend=scan_backend,
                    )
                    for _ in range(config.depths[level])
                )
            )

        deepest = LEVELS - 1
        self.stem = nn.Conv2d(feature_channels[deepest], widths[deepest], kernel_size=1)
        self.levels = nn.ModuleList(blocks(i) for i in range(LEVELS))
        self.ups = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], kernel_size=1) for i in range(deepest))
        self.fuse = nn.ModuleList(
            nn.Conv2d(widths[i] + feature_channels[i], widths[i], kernel_size=1) for i in range(deepest)
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=3, padding=1, bias=True)
        if config.global_residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.get_parameter("bias"))

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x (B, 1, H, W)`` (used by the global residual) and the 5 LangAE features -> ``(B, 1, H, W)``."""
        if len(features) != LEVELS:
            raise InputError(f"DenoiserDecoder expects {LEVELS} feature maps, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.feature_channels)):
            if f.ndim != 4 or f.shape[1] != c:
                raise InputError(f"DenoiserDecoder feature {i} must have {c} channels, got shape {tuple(f.shape)}")
        h = self.levels[-1](self.stem(features[-1]))
        for i in reversed(range(LEVELS - 1)):
            skip = features[i]
            h = F.interpolate(self.ups[i](h), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = self.levels[i](self.fuse[i](torch.cat([h, skip.to(h.dtype)], dim=1)))
        out: torch.Tensor = self.head(h)
        return x + out if self.global_residual else out


@register_model
class LangMamba(nn.Module):
    """Frozen LangAE encoder + trainable Mamba decoder: a low-dose slice in, a denoised slice out.

    ``forward(x)``: ``x (B, 1, H, W)`` in model range, any ``H, W``; the slice is reflect-padded on the
    bottom/right to multiples of the LangAE's downsampling factor (16) and the output cropped back.
    The LangAE's parameters never require gradients and it stays in eval mode even under
    :meth:`train`; its features are computed without autograd.

    The arguments are the fields of :class:`~langmamba.models.config.LangMambaConfig` (what
    :meth:`get_config` returns and checkpoints store); :meth:`from_config` takes the config itself.

    Args:
        langae_config: the stage-1 LangAE's architecture (:class:`LangAEConfig` or its dict form; load its
            weights with :meth:`from_langae` or a checkpoint).
        decoder: the decoder's architecture (:class:`DecoderConfig` or its dict form; default ``"fast"``).
        langae_decoder: keep the LangAE's image decoder. Denoising and explanations need only its encoder
            and quantizer, so shipped inference checkpoints drop it (a third of the weights).
        scan_backend: selective-scan backend (a run-time choice, not saved in checkpoints).
        vocabulary, vlm_backend, vlm_id: the LangAE's word metadata (see :class:`LangAE`).
        **decoder_overrides: single :class:`DecoderConfig` fields on top of ``decoder`` (also how the
            first checkpoints, with the decoder's fields at the top level, are read).
    """

    def __init__(
        self,
        langae_config: LangAEConfig | Mapping[str, Any],
        decoder: DecoderConfig | Mapping[str, Any] | None = None,
        *,
        langae_decoder: bool = True,
        scan_backend: str = "auto",
        vocabulary: Sequence[str] | None = None,
        vlm_backend: str | None = None,
        vlm_id: str | None = None,
        **decoder_overrides: Any,
    ) -> None:
        super().__init__()
        config = LangMambaConfig.from_dict(
            {"langae_config": langae_config, "decoder": decoder or {}, "langae_decoder": langae_decoder}
            | decoder_overrides
        )
        self.langae = LangAE(config.langae_config, vocabulary=vocabulary, vlm_backend=vlm_backend, vlm_id=vlm_id)
        if not config.langae_decoder:
            self.langae.decoder = None
            self.langae.post_quant_conv = None
        self.langae.requires_grad_(False)
        self.langae.eval()
        self.decoder = DenoiserDecoder(
            self.langae.feature_channels,
            config.decoder,
            out_channels=self.langae.config.in_channels,
            scan_backend=scan_backend,
        )
        self.config = LangMambaConfig(self.langae.config, config.decoder, config.langae_decoder)
        """The architecture (the LangAE's with the codebook sizes it was built with)."""

    @classmethod
    def from_config(cls, config: LangMambaConfig, scan_backend: str = "auto") -> LangMamba:
        """A LangMamba of ``config`` with untrained weights (an empty codebook)."""
        return cls(
            config.langae_config, config.decoder, langae_decoder=config.langae_decoder, scan_backend=scan_backend
        )

    @classmethod
    def from_langae(
        cls,
        langae: LangAE,
        decoder: DecoderConfig | None = None,
        *,
        langae_decoder: bool = True,
        scan_backend: str = "auto",
        **decoder_overrides: Any,
    ) -> LangMamba:
        """A LangMamba around a copy of a trained ``langae`` (weights and vocabulary metadata)."""
        model = cls(
            langae.config, decoder, langae_decoder=langae_decoder, scan_backend=scan_backend, **decoder_overrides
        )
        keep = model.langae.state_dict()  # without the image decoder when langae_decoder=False
        model.langae.load_state_dict({k: v for k, v in langae.state_dict().items() if k in keep})
        for key in ("vocabulary", "vlm_backend", "vlm_id"):
            setattr(model.langae, key, getattr(langae, key, None))
        return model.to(next(langae.parameters()).device)

    def get_config(self) -> dict[str, Any]:
        """``config.to_dict()``: JSON-serialisable keyword arguments that rebuild the architecture (the
        checkpoint format stores it as ``model_config``)."""
        return self.config.to_dict()

    def without_langae_decoder(self) -> LangMamba:
        """A copy for inference only: the same weights without the LangAE's image decoder."""
        model = type(self).from_config(self.config.replace(langae_decoder=False))
        state = {k: v for k, v in self.state_dict().items() if k in model.state_dict()}
        model.load_state_dict(state, strict=True)
        for key in ("vocabulary", "vlm_backend", "vlm_id"):
            setattr(model.langae, key, getattr(self.langae, key, None))
        return model

    def train(self, mode: bool = True) -> LangMamba:
        super().train(mode)
        self.langae.eval()  # frozen stage-1 model: its dropout/normalisation stay in inference mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.decoder.head.out_channels:
            raise InputError(
                f"LangMamba expects slices (B, {self.decoder.head.out_channels}, H, W), got shape {tuple(x.shape)}"
            )
        height, width = x.shape[-2:]
        factor = self.langae.downsample_factor
        pad_h, pad_w = -height % factor, -width % factor
        if pad_h or pad_w:
            # Reflection needs the pad to be smaller than the side; tiny inputs are edge-replicated.
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        with torch.no_grad():
            features = self.langae.encode_features(x)
        out: torch.Tensor = self.decoder(x, features)[..., :height, :width]
        return out
