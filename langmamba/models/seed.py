"""SEED: LangMamba's stage-2 denoiser, a U-decoder on the frozen LangAE encoder's feature pyramid.

Starting from the deepest LangAE feature (``H/16``), each level runs SEED blocks (SS2D selective-scan
mixer, conv block with channel attention and a spatial attention gate, conv feed-forward), then
upsamples ×2 and fuses the LangAE encoder feature of the next finer level, up to full resolution,
where a 3×3 conv gives the 1-channel output. The full- and half-resolution levels are conv-only and
narrow (an SS2D there would scan 65,536 / 16,384 tokens per direction for little gain). The default
widths (16, 32, 48, 96, 128), depths (1, 1, 1, 2, 2) and SS2D state size 8 were chosen against the
speed targets (``python -m langmamba.bench.model``): on an H100 with bf16 autocast and batches of 64
512² slices, LangMamba ran 338 slices/s (with depths (1, 1, 2, 2, 2): 307 at state 8, 296 at state
16); on 2 CPU cores in fp32 a 512² slice takes about a second.

:class:`LangMamba` couples a frozen LangAE (never trained here, always in eval mode) with a trainable
:class:`SEEDDecoder`; images are ``(B, 1, H, W)`` in model range (see :mod:`langmamba.normalization`).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from langmamba.models.registry import register_model
from langmamba.errors import ConfigError, InputError
from langmamba.models.langae import LangAE
from langmamba.models.ss2d import SS2D, LayerNorm2d

LEVELS = 5
"""Resolution levels of the decoder: H, H/2, H/4, H/8, H/16 (the LangAE encoder's)."""

DECODER_PRESETS: dict[str, dict] = {
    # The speed-first decoder of the first shipped weights (the constructor's defaults).
    "fast": {},
    # Wider, SS2D from half resolution down, state 16.
    "medium": {"widths": (32, 64, 96, 128, 128), "depths": (1, 1, 2, 2, 2),
               "ssm_levels": (False, True, True, True, True), "d_state": 16},
    # The paper's configuration: 64-128 channels and Mamba (SS2D) blocks at every level.
    "paper": {"widths": (64, 64, 128, 128, 128), "depths": (1, 1, 2, 2, 2),
              "ssm_levels": (True, True, True, True, True), "d_state": 16},
}
"""Named :class:`SEEDDecoder` width/depth choices (training's ``seed.decoder_preset``); the keys of
``seed.decoder`` override single arguments on top of the preset."""


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
        return self.spatial_gate(self.channel_attention(self.conv2(F.gelu(self.conv1(x)))))


class ConvFeedForward(nn.Module):
    """1×1 expand, depthwise 3×3, GELU, 1×1 project. ``(B, C, H, W) -> (B, C, H, W)``."""

    def __init__(self, channels: int, ratio: float = 2.0) -> None:
        super().__init__()
        hidden = max(1, int(round(channels * ratio)))
        self.expand = nn.Conv2d(channels, hidden, kernel_size=1)
        self.depthwise = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1, groups=hidden)
        self.project = nn.Conv2d(hidden, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(F.gelu(self.depthwise(self.expand(x))))


class SEEDBlock(nn.Module):
    """One SEED block on ``(B, C, H, W)``: ``x + SS2D(LN x)`` (if ``use_ssm``), ``+ ConvAttention(x)``,
    ``+ FFN(LN x)``. Conv-only blocks (``use_ssm=False``) skip the SS2D and the norms.

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
        return x + self.ffn(self.norm_ffn(x))


class SEEDDecoder(nn.Module):
    """Trainable U-decoder: LangAE features ``[(B, F_i, H/2^i, W/2^i)]_{i<5}`` -> ``(B, 1, H, W)``.

    Level ``i`` works at width ``widths[i]`` with ``depths[i]`` SEED blocks (SS2D where
    ``ssm_levels[i]``). From the deepest level up: 1×1 projection of the LangAE feature, blocks, then
    for each finer level a 1×1 conv and bilinear ×2 upsampling, concatenation with that level's LangAE
    feature, a 1×1 fusion conv, blocks; a 3×3 head gives the output.

    Args:
        feature_channels: channels ``F_i`` of the 5 LangAE feature maps (``LangAE.feature_channels``).
        widths: decoder channels per level, full resolution first.
        depths: SEED blocks per level (0 allowed).
        ssm_levels: which levels use SS2D in their blocks.
        d_state: SS2D state size.
        expand: SS2D ``d_inner / width``.
        step: SS2D scan stride.
        ffn_ratio: feed-forward width multiple.
        global_residual: return ``x + head(...)`` (the head starts at zero, so the untrained decoder
            is the identity) instead of ``head(...)``.
        out_channels: output channels (1 for CT).
        scan_backend: selective-scan backend of every SS2D.
    """

    def __init__(
        self,
        feature_channels: Sequence[int] = (64, 64, 128, 128, 256),
        widths: Sequence[int] = (16, 32, 48, 96, 128),
        depths: Sequence[int] = (1, 1, 1, 2, 2),
        ssm_levels: Sequence[bool] = (False, False, True, True, True),
        d_state: int = 8,
        expand: float = 2.0,
        step: int = 2,
        ffn_ratio: float = 2.0,
        global_residual: bool = True,
        out_channels: int = 1,
        scan_backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("feature_channels", feature_channels), ("widths", widths), ("depths", depths),
                            ("ssm_levels", ssm_levels)):
            if len(value) != LEVELS:
                raise ConfigError(f"SEEDDecoder {name} must have {LEVELS} entries (H ... H/16), got {len(value)}")
        if min(widths) < 1 or min(depths) < 0:
            raise ConfigError(f"SEEDDecoder widths must be positive and depths non-negative, got {widths}, {depths}")
        self.feature_channels = tuple(int(c) for c in feature_channels)
        self.global_residual = global_residual

        def blocks(level: int) -> nn.Sequential:
            return nn.Sequential(*(
                SEEDBlock(widths[level], use_ssm=bool(ssm_levels[level]), d_state=d_state, expand=expand,
                          step=step, ffn_ratio=ffn_ratio, scan_backend=scan_backend)
                for _ in range(depths[level])
            ))

        deepest = LEVELS - 1
        self.stem = nn.Conv2d(feature_channels[deepest], widths[deepest], kernel_size=1)
        self.levels = nn.ModuleList(blocks(i) for i in range(LEVELS))
        self.ups = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i], kernel_size=1) for i in range(deepest))
        self.fuse = nn.ModuleList(
            nn.Conv2d(widths[i] + feature_channels[i], widths[i], kernel_size=1) for i in range(deepest)
        )
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=3, padding=1)
        if global_residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """``x (B, 1, H, W)`` (used by the global residual) and the 5 LangAE features -> ``(B, 1, H, W)``."""
        if len(features) != LEVELS:
            raise InputError(f"SEEDDecoder expects {LEVELS} feature maps, got {len(features)}")
        for i, (f, c) in enumerate(zip(features, self.feature_channels)):
            if f.ndim != 4 or f.shape[1] != c:
                raise InputError(f"SEEDDecoder feature {i} must have {c} channels, got shape {tuple(f.shape)}")
        h = self.levels[-1](self.stem(features[-1]))
        for i in reversed(range(LEVELS - 1)):
            skip = features[i]
            h = F.interpolate(self.ups[i](h), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = self.levels[i](self.fuse[i](torch.cat([h, skip.to(h.dtype)], dim=1)))
        out = self.head(h)
        return x + out if self.global_residual else out


@register_model
class LangMamba(nn.Module):
    """Frozen LangAE encoder + trainable SEED decoder: a low-dose slice in, a denoised slice out.

    ``forward(x)``: ``x (B, 1, H, W)`` in model range, any ``H, W``; the slice is reflect-padded on the
    bottom/right to multiples of the LangAE's downsampling factor (16) and the output cropped back.
    The LangAE's parameters never require gradients and it stays in eval mode even under
    :meth:`train`; its features are computed without autograd.

    Args:
        langae_config: :meth:`LangAE.get_config` of the stage-1 model (load its weights with
            :meth:`from_langae` or a checkpoint).
        widths, depths, ssm_levels, d_state, expand, step, ffn_ratio, global_residual: see
            :class:`SEEDDecoder`.
        scan_backend: selective-scan backend (a run-time choice, not saved in checkpoints).
        langae_decoder: keep the LangAE's image decoder. Denoising and explanations need only its encoder
            and quantizer, so shipped inference checkpoints drop it (a third of the weights).
    """

    def __init__(
        self,
        langae_config: dict,
        widths: Sequence[int] = (16, 32, 48, 96, 128),
        depths: Sequence[int] = (1, 1, 1, 2, 2),
        ssm_levels: Sequence[bool] = (False, False, True, True, True),
        d_state: int = 8,
        expand: float = 2.0,
        step: int = 2,
        ffn_ratio: float = 2.0,
        global_residual: bool = True,
        scan_backend: str = "auto",
        langae_decoder: bool = True,
    ) -> None:
        super().__init__()
        self.langae = LangAE(**langae_config)
        if not langae_decoder:
            self.langae.decoder = None
            self.langae.post_quant_conv = None
        self.langae.requires_grad_(False)
        self.langae.eval()
        in_channels = self.langae.get_config()["in_channels"]
        self.decoder = SEEDDecoder(
            feature_channels=self.langae.feature_channels,
            widths=widths,
            depths=depths,
            ssm_levels=ssm_levels,
            d_state=d_state,
            expand=expand,
            step=step,
            ffn_ratio=ffn_ratio,
            global_residual=global_residual,
            out_channels=in_channels,
            scan_backend=scan_backend,
        )
        self._config = {
            "langae_config": self.langae.get_config(),
            "widths": [int(w) for w in widths],
            "depths": [int(d) for d in depths],
            "ssm_levels": [bool(s) for s in ssm_levels],
            "d_state": int(d_state),
            "expand": float(expand),
            "step": int(step),
            "ffn_ratio": float(ffn_ratio),
            "global_residual": bool(global_residual),
            "langae_decoder": bool(langae_decoder),
        }

    @classmethod
    def from_langae(cls, langae: LangAE, **kwargs) -> LangMamba:
        """A LangMamba around a copy of a trained ``langae`` (weights and vocabulary metadata)."""
        model = cls(langae.get_config(), **kwargs)
        keep = model.langae.state_dict()  # without the image decoder when langae_decoder=False
        model.langae.load_state_dict({k: v for k, v in langae.state_dict().items() if k in keep})
        for key in ("vocabulary", "vlm_backend", "vlm_id"):
            setattr(model.langae, key, getattr(langae, key, None))
        return model.to(next(langae.parameters()).device)

    def get_config(self) -> dict:
        """JSON-serialisable constructor arguments (the checkpoint format rebuilds the model from them)."""
        return copy.deepcopy(self._config)

    def without_langae_decoder(self) -> LangMamba:
        """A copy for inference only: the same weights without the LangAE's image decoder."""
        config = self.get_config() | {"langae_decoder": False}
        model = type(self)(**config)
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
        return self.decoder(x, features)[..., :height, :width]
