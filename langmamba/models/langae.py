"""LangAE: the language-quantized VQGAN autoencoder of LangMamba's first stage.

A VQGAN encoder maps a 1-channel slice in model range (see :mod:`langmamba.normalization`) to a latent
at 1/16 resolution in the word-embedding space, the :class:`PyramidLanguageQuantizer` replaces it by
words of a frozen vocabulary, and a VQGAN decoder reconstructs the slice. Stage 2 (the denoiser) reuses
the frozen encoder's per-level feature maps (:meth:`LangAE.encode_features`) and its latents (LangDA loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from langmamba.errors import ConfigError, InputError
from langmamba.models.blocks import AttnBlock, Downsample, MidBlock, ResnetBlock, Upsample, normalization
from langmamba.models.config import LangAEConfig
from langmamba.models.quantizer import CandidateSpec, PyramidLanguageQuantizer, QuantizerOutput
from langmamba.models.registry import register_model
from langmamba.models.residual_quantizer import ResidualLanguageQuantizer

QUANTIZERS = ("average", "residual")
"""The kinds of word quantizer (:attr:`LangAEConfig.quantizer`)."""


class _Level(nn.Module):
    """Residual blocks (each followed by attention where the level has it) of one resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, attention: bool, dropout: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, dropout) for i in range(num_blocks)
        )
        self.attentions = nn.ModuleList(AttnBlock(out_channels) for _ in range(num_blocks)) if attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if self.attentions is not None:
                x = self.attentions[i](x)
        return x


class Encoder(nn.Module):
    """VQGAN encoder: ``(B, in_channels, H, W) -> (B, z_channels, H / 2^(n-1), W / 2^(n-1))``.

    ``n = len(channel_multipliers)`` levels; level ``i`` has ``base_channels * channel_multipliers[i]``
    channels and is followed by a downsampling except the last.
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        attention_levels: Sequence[bool],
        z_channels: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, base_channels, kernel_size=3, padding=1)
        widths = [base_channels * m for m in channel_multipliers]
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        previous = base_channels
        for i, width in enumerate(widths):
            self.levels.append(_Level(previous, width, num_res_blocks, attention_levels[i], dropout))
            if i < len(widths) - 1:
                self.downsamples.append(Downsample(width))
            previous = width
        self.mid = MidBlock(previous, dropout)
        self.norm_out = normalization(previous)
        self.conv_out = nn.Conv2d(previous, z_channels, kernel_size=3, padding=1)
        self.feature_channels: tuple[int, ...] = tuple(widths)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Per-level feature maps, each taken before that level's downsampling."""
        h = self.conv_in(x)
        features = []
        for i, level in enumerate(self.levels):
            h = level(h)
            features.append(h)
            if i < len(self.downsamples):
                h = self.downsamples[i](h)
        return features

    def head(self, deepest: torch.Tensor) -> torch.Tensor:
        """Middle block, norm, SiLU and ``conv_out`` on the deepest feature map -> ``(B, z_channels, h, w)``."""
        out: torch.Tensor = self.conv_out(F.silu(self.norm_out(self.mid(deepest))))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)[-1])


class Decoder(nn.Module):
    """VQGAN decoder: ``(B, z_channels, h, w) -> (B, out_channels, h * 2^(n-1), w * 2^(n-1))``.

    Mirrors :class:`Encoder` with ``num_res_blocks + 1`` residual blocks per level, as in VQGAN.
    The output is linear (no sigmoid), so the reconstruction loss sees overshoot beyond [0, 1].
    """

    def __init__(
        self,
        out_channels: int,
        base_channels: int,
        channel_multipliers: Sequence[int],
        num_res_blocks: int,
        attention_levels: Sequence[bool],
        z_channels: int,
        dropout: float,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_multipliers]
        self.conv_in = nn.Conv2d(z_channels, widths[-1], kernel_size=3, padding=1)
        self.mid = MidBlock(widths[-1], dropout)
        self.levels = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        previous = widths[-1]
        for i in reversed(range(len(widths))):
            self.levels.append(_Level(previous, widths[i], num_res_blocks + 1, attention_levels[i], dropout))
            if i > 0:
                self.upsamples.append(Upsample(widths[i]))
            previous = widths[i]
        self.norm_out = normalization(previous)
        self.conv_out = nn.Conv2d(previous, out_channels, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for i, level in enumerate(self.levels):
            h = level(h)
            if i < len(self.upsamples):
                h = self.upsamples[i](h)
        out: torch.Tensor = self.conv_out(F.silu(self.norm_out(h)))
        return out


@register_model
class LangAE(nn.Module):
    """Language-quantized autoencoder for CT slices (LangMamba stage 1).

    Shapes for ``x (B, in_channels, H, W)`` in model range, ``H`` and ``W`` multiples of
    ``2^(n-1)`` (16 for the 5 paper levels), latent ``h, w = H / 16, W / 16`` (below 8, e.g. for 64²
    patches, the quantizer's 8×8 level is clamped to the latent size):

    - :meth:`encode_features`: ``[(B, 64, H, W), (B, 64, H/2, W/2), (B, 128, H/4, W/4),
      (B, 128, H/8, W/8), (B, 256, H/16, W/16)]`` for the paper config (``feature_channels``).
    - :meth:`encode`: ``(B, E, h, w)`` continuous latent in the codebook space.
    - :meth:`quantize`: :class:`QuantizerOutput` with ``quantized (B, E, h, w)``.
    - :meth:`decode`: ``(B, in_channels, H, W)``.

    Args:
        config: the architecture (:class:`~langmamba.models.config.LangAEConfig`); keyword arguments named
            like its fields override single values (``LangAE(base_channels=8, z_channels=8)``). Its fields
            in short: ``in_channels`` (1 for CT); ``base_channels`` of the first level (paper: 64);
            ``channel_multipliers`` per level (paper: (1, 1, 2, 2, 4) = 5 levels, 4 downsamplings);
            ``num_res_blocks`` per encoder level (the decoder has one more, as in VQGAN);
            ``attention_resolutions``: side lengths at which a level gets self-attention after each residual
            block, counted from ``resolution`` as in VQGAN (the middle block always has attention); with
            the paper's 512 and (16,), no level reaches side 16, so only the middle block (at the 32×32
            latent of a 512² slice) attends; ``z_channels`` before the codebook projection; ``dropout``;
            ``codebook_size``/``codebook_dim`` to build an empty codebook that a checkpoint fills;
            ``quantizer_grids`` (averaging quantizer's coarse grids); ``beta`` (commitment weight);
            ``normalize_latent``: scale every latent vector to the codebook's mean row norm before
            quantizing. With a frozen codebook nothing else bounds the encoder output: the straight-through
            gradient keeps pushing latents that cannot reach a better word. In short training runs on
            chest CT without it, latent norms grew from 3 to several hundred against unit-norm word
            embeddings (even with beta = 1) and only a few dozen words stayed in use; with it training
            was stable and word use grew. ``quantizer``: ``"average"`` (the first checkpoints: SPAE
            streaming average at ``quantizer_grids``) or ``"residual"``
            (:class:`~langmamba.models.residual_quantizer.ResidualLanguageQuantizer`: word levels at
            ``region_sizes`` and ``detail_stages`` × ``detail_groups`` token codes that add up, calibrated
            word reading at ``logit_scale``); ``word_classes``: the tissue class of every vocabulary word
            (``langmamba.vlm.vocabulary.WORD_CLASSES``).
        codebook: frozen ``(V, E)`` word embeddings from ``langmamba.vlm`` (else an empty buffer of
            ``codebook_size × codebook_dim``).
        detail_codebook, detail_projection: residual quantizer only: ``(N, d)`` token codes and ``(d, E)``
            projection (:mod:`langmamba.vlm.token_codes`); else ``detail_codebook_size`` and ``detail_dim``.
        vocabulary: the V words of the codebook rows (kept for reports and checkpoints).
        vlm_backend: name of the language backend that made the codebook (recorded in checkpoints).
        vlm_id: model id of that backend.
    """

    def __init__(
        self,
        config: LangAEConfig | None = None,
        *,
        codebook: torch.Tensor | None = None,
        detail_codebook: torch.Tensor | None = None,
        detail_projection: torch.Tensor | None = None,
        vocabulary: Sequence[str] | None = None,
        vlm_backend: str | None = None,
        vlm_id: str | None = None,
        **overrides: Any,
    ) -> None:
        super().__init__()
        try:
            config = (config or LangAEConfig()).replace(**overrides)
        except ConfigError as error:
            raise InputError(str(error)) from error
        if config.quantizer == "average":
            self.quantizer: PyramidLanguageQuantizer | ResidualLanguageQuantizer = PyramidLanguageQuantizer(
                codebook,
                codebook_size=config.codebook_size,
                codebook_dim=config.codebook_dim,
                grids=config.quantizer_grids,
                beta=config.beta,
            )
            config = config.replace(
                codebook_size=self.quantizer.codebook_size, codebook_dim=self.quantizer.codebook_dim
            )
        else:
            residual = ResidualLanguageQuantizer(
                codebook,
                codebook_size=config.codebook_size,
                codebook_dim=config.codebook_dim,
                detail_codebook=detail_codebook,
                detail_projection=detail_projection,
                detail_codebook_size=config.detail_codebook_size,
                detail_dim=config.detail_dim,
                region_sizes=config.region_sizes,
                detail_stages=config.detail_stages,
                detail_groups=config.detail_groups,
                beta=config.beta,
                project_latent=config.project_latent,
                logit_scale=config.logit_scale,
            )
            self.quantizer = residual
            config = config.replace(
                codebook_size=residual.codebook_size,
                codebook_dim=residual.codebook_dim,
                region_sizes=list(residual.region_sizes),
                detail_codebook_size=int(residual.detail_codebook.shape[0]),
                detail_dim=int(residual.detail_codebook.shape[1]),
            )
        codebook_size = self.quantizer.codebook_size
        if config.word_classes is not None and len(config.word_classes) != codebook_size:
            raise InputError(f"{len(config.word_classes)} word classes for a vocabulary of {codebook_size} words")
        self.config: LangAEConfig = config
        """The architecture, with the codebook sizes of the tensors it was built from."""
        self.word_classes: list[str] | None = None if config.word_classes is None else list(config.word_classes)
        if vocabulary is not None and len(vocabulary) != codebook_size:
            raise InputError(f"the vocabulary has {len(vocabulary)} words but the codebook has {codebook_size} rows")
        self.vocabulary: list[str] | None = None if vocabulary is None else [str(v) for v in vocabulary]
        self.vlm_backend = vlm_backend
        self.vlm_id = vlm_id
        self.normalize_latent = bool(config.normalize_latent)

        channel_multipliers, resolution, z_channels = config.channel_multipliers, config.resolution, config.z_channels
        levels = len(channel_multipliers)
        self.downsample_factor = 2 ** (levels - 1)
        attention_levels = [resolution // 2**i in set(config.attention_resolutions) for i in range(levels)]
        common: dict[str, Any] = dict(
            base_channels=config.base_channels,
            channel_multipliers=channel_multipliers,
            num_res_blocks=config.num_res_blocks,
            attention_levels=attention_levels,
            z_channels=z_channels,
            dropout=config.dropout,
        )
        self.encoder = Encoder(in_channels=config.in_channels, **common)
        # 1×1 projections between the VQGAN latent width and the word-embedding space.
        self.quant_conv = nn.Conv2d(z_channels, self.quantizer.codebook_dim, kernel_size=1)
        # Inference copies drop the image decoder (LangMamba(langae_decoder=False)): both become None.
        self.post_quant_conv: nn.Conv2d | None = nn.Conv2d(self.quantizer.codebook_dim, z_channels, kernel_size=1)
        self.decoder: Decoder | None = Decoder(out_channels=config.in_channels, **common)
        self.feature_channels: tuple[int, ...] = self.encoder.feature_channels

    @property
    def codebook(self) -> torch.Tensor:
        """The frozen ``(V, E)`` word-embedding buffer (shared with the quantizer)."""
        return self.quantizer.codebook

    def get_config(self) -> dict[str, Any]:
        """``config.to_dict()``: JSON-serialisable keyword arguments that rebuild this architecture
        (weights excluded; the checkpoint format stores it as ``model_config``)."""
        return self.config.to_dict()

    def _check_input(self, x: torch.Tensor) -> None:
        expected = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != expected:
            raise InputError(f"LangAE expects slices of shape (B, {expected}, H, W), got {tuple(x.shape)}")
        factor = self.downsample_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise InputError(
                f"LangAE needs H and W to be multiples of {factor}, got {x.shape[-2]}×{x.shape[-1]}; "
                "pad the slice first"
            )

    def encode_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps of ``x (B, C, H, W)``, one per level before its downsampling.

        Level ``i`` has shape ``(B, feature_channels[i], H / 2^i, W / 2^i)``.
        """
        self._check_input(x)
        return self.encoder.features(x)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latent ``(B, E, H/16, W/16)`` of ``x (B, C, H, W)`` in the codebook space.

        With ``normalize_latent`` each latent vector is scaled to the codebook's mean row norm.
        """
        self._check_input(x)
        z: torch.Tensor = self.quant_conv(self.encoder(x))
        if self.normalize_latent:
            z = F.normalize(z, dim=1, eps=1e-6) * self.quantizer.mean_row_norm().to(z.dtype)
        return z

    def quantize(
        self, z: torch.Tensor, candidates: Sequence[CandidateSpec | None] | None = None, details: bool = True
    ) -> QuantizerOutput:
        """Pyramid word quantization of ``z (B, E, h, w)``; ``candidates`` per level feed the semantic loss.

        ``details=False`` skips the residual quantizer's detail stages (words only, for explanations; the
        averaging quantizer has none and ignores it)."""
        out: QuantizerOutput
        if isinstance(self.quantizer, ResidualLanguageQuantizer):
            out = self.quantizer(z, candidates, details=details)
        else:
            out = self.quantizer(z, candidates)
        return out

    def decode(self, zq: torch.Tensor) -> torch.Tensor:
        """Slice ``(B, C, 16h, 16w)`` from a (quantized) latent ``(B, E, h, w)``."""
        if self.decoder is None or self.post_quant_conv is None:
            raise InputError("this LangAE has no image decoder (an inference copy inside LangMamba); it cannot decode")
        out: torch.Tensor = self.decoder(self.post_quant_conv(zq))
        return out

    def forward(
        self, x: torch.Tensor, candidates: Sequence[CandidateSpec | None] | None = None
    ) -> tuple[torch.Tensor, QuantizerOutput]:
        """``x (B, C, H, W) -> (reconstruction (B, C, H, W), QuantizerOutput)``."""
        quantized = self.quantize(self.encode(x), candidates)
        return self.decode(quantized.quantized), quantized
