"""Architecture configurations of LangMamba's networks, in the manner of mamba-ssm's ``MambaConfig``.

Each config is a frozen dataclass of plain values (no tensors) with typed defaults. A model keeps its
config as ``model.config`` and ``model.get_config()`` returns :meth:`to_dict` of it, the
``dataclasses.asdict`` form (tuples as lists) that checkpoints store as ``model_config``.
:meth:`from_dict` reads that form back, including the older checkpoints' keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from langmamba.errors import ConfigError

if TYPE_CHECKING:  # typing.Self is Python 3.11+; the annotations are strings (PEP 563), so 3.10 never needs it
    from typing_extensions import Self

LEVELS = 5
"""Resolution levels of the denoiser's decoder: H, H/2, H/4, H/8, H/16 (the LangAE encoder's)."""


def _jsonable(value: Any) -> Any:
    """Tuples (nested too) as lists, the form JSON gives back."""
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _tupled(value: Any) -> Any:
    """Lists (nested too) as tuples, so configs read from JSON compare equal and stay hashable."""
    if isinstance(value, (list, tuple)):
        return tuple(_tupled(v) for v in value)
    return value


class _Serialisable:
    """``to_dict``/``from_dict`` shared by the configs below."""

    def to_dict(self) -> dict[str, Any]:
        """``dataclasses.asdict`` with tuples as lists: what a checkpoint's ``config.json`` holds."""
        result: dict[str, Any] = _jsonable(dataclasses.asdict(self))  # type: ignore[call-overload]
        return result

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Self:
        """The config from :meth:`to_dict`'s form; an unknown key raises :class:`ConfigError` naming it."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**{k: _tupled(v) for k, v in values.items()})

    def replace(self, **changes: Any) -> Self:
        """A copy with ``changes`` (checked like :meth:`from_dict`)."""
        return type(self).from_dict({**self.to_dict(), **changes})


@dataclass(frozen=True)
class LangAEConfig(_Serialisable):
    """Architecture of :class:`~langmamba.models.langae.LangAE` (stage 1); see its docstring for each field.

    The codebook tensors are not part of the config: ``codebook_size``/``codebook_dim`` (and the residual
    quantizer's ``detail_codebook_size``/``detail_dim``) size empty buffers that a checkpoint's weights fill;
    a model built from tensors records their sizes here.

    Attributes:
        in_channels: image channels (1 for CT).
        base_channels: channels of the first level (paper: 64).
        channel_multipliers: per-level width factors (paper: (1, 1, 2, 2, 4): 5 levels, 4 downsamplings).
        num_res_blocks: residual blocks per encoder level.
        attention_resolutions: side lengths (counted from ``resolution``) of levels with self-attention.
        resolution: nominal input side in pixels, used only to place attention.
        z_channels: channels of the encoder output before the codebook projection.
        dropout: dropout rate inside residual blocks.
        codebook_size: V, words of the frozen vocabulary.
        codebook_dim: E, the word-embedding width.
        quantizer_grids: averaging quantizer: region grids of the coarse pyramid levels.
        beta: commitment-loss weight.
        normalize_latent: scale latents to the codebook's mean row norm before quantizing.
        quantizer: ``"average"`` (the first checkpoints) or ``"residual"``.
        region_sizes: residual quantizer: latent cells per region side of each word level.
        detail_codebook_size: residual quantizer: N token codes.
        detail_dim: residual quantizer: d, the token-code width.
        detail_stages: residual quantizer: detail stages per latent cell.
        detail_groups: residual quantizer: token codes per latent cell and stage.
        project_latent: residual quantizer: reduce the latent to the span its codes can reach.
        logit_scale: residual quantizer: initial word-reading temperature.
        word_classes: the tissue class of every vocabulary word, or ``None``.
    """

    in_channels: int = 1
    base_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (16,)
    resolution: int = 512
    z_channels: int = 256
    dropout: float = 0.0
    codebook_size: int | None = None
    codebook_dim: int | None = None
    quantizer_grids: tuple[tuple[int, ...], ...] = ((2, 2), (8, 8))
    beta: float = 0.25
    normalize_latent: bool = True
    quantizer: str = "average"
    region_sizes: tuple[int, ...] = (8, 4, 2)
    detail_codebook_size: int | None = None
    detail_dim: int | None = None
    detail_stages: int = 8
    detail_groups: int = 1
    project_latent: bool = False
    logit_scale: float = 10.0
    word_classes: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.channel_multipliers:
            raise ConfigError("LangAEConfig.channel_multipliers must name at least one level")
        if self.num_res_blocks < 1 or self.base_channels < 1 or self.z_channels < 1:
            raise ConfigError("LangAEConfig num_res_blocks, base_channels and z_channels must be positive")
        if self.quantizer not in ("average", "residual"):
            raise ConfigError(f"LangAEConfig.quantizer must be one of average, residual, got {self.quantizer!r}")


@dataclass(frozen=True)
class DecoderConfig(_Serialisable):
    """Architecture of the denoiser's Mamba U-decoder (:class:`~langmamba.models.denoiser.DenoiserDecoder`).

    Level ``i`` (full resolution first, down to H/16) works at ``widths[i]`` channels with ``depths[i]``
    blocks, SS2D selective scans where ``ssm_levels[i]``. The defaults are the speed-first decoder of the
    first shipped weights (preset ``"fast"``); :data:`DECODER_PRESETS` names the others.

    Attributes:
        widths: decoder channels per level.
        depths: blocks per level (0 allowed).
        ssm_levels: which levels use SS2D in their blocks.
        d_state: SS2D state size.
        expand: SS2D ``d_inner / width``.
        step: SS2D scan stride (2 = EfficientVMamba's skip-sampled scan).
        ffn_ratio: feed-forward width as a multiple of the level width.
        global_residual: output ``x + head(...)`` (the head starts at zero, so the untrained decoder is the
            identity) instead of ``head(...)``.
    """

    widths: tuple[int, ...] = (16, 32, 48, 96, 128)
    depths: tuple[int, ...] = (1, 1, 1, 2, 2)
    ssm_levels: tuple[bool, ...] = (False, False, True, True, True)
    d_state: int = 8
    expand: float = 2.0
    step: int = 2
    ffn_ratio: float = 2.0
    global_residual: bool = True

    def __post_init__(self) -> None:
        for name in ("widths", "depths", "ssm_levels"):
            value = getattr(self, name)
            if len(value) != LEVELS:
                raise ConfigError(f"DecoderConfig {name} must have {LEVELS} entries (H ... H/16), got {len(value)}")
        if min(self.widths) < 1 or min(self.depths) < 0:
            raise ConfigError(
                f"DecoderConfig widths must be positive and depths non-negative, got {self.widths}, {self.depths}"
            )
        if self.d_state < 1 or self.step < 1:
            raise ConfigError(f"DecoderConfig d_state and step must be positive, got {self.d_state}, {self.step}")

    @classmethod
    def preset(cls, name: str) -> DecoderConfig:
        """The named decoder of :data:`DECODER_PRESETS`; an unknown name raises :class:`ConfigError`."""
        if name not in DECODER_PRESETS:
            raise ConfigError(f"unknown decoder preset {name!r}; known: {', '.join(DECODER_PRESETS)}")
        return DECODER_PRESETS[name]


DECODER_PRESETS: dict[str, DecoderConfig] = {
    # The speed-first decoder of the first shipped weights (the defaults).
    "fast": DecoderConfig(),
    # Wider, SS2D from half resolution down, state 16.
    "medium": DecoderConfig(
        widths=(32, 64, 96, 128, 128), depths=(1, 1, 2, 2, 2), ssm_levels=(False, True, True, True, True), d_state=16
    ),
    # The paper's configuration: 64-128 channels and Mamba (SS2D) blocks at every level.
    "paper": DecoderConfig(
        widths=(64, 64, 128, 128, 128), depths=(1, 1, 2, 2, 2), ssm_levels=(True, True, True, True, True), d_state=16
    ),
}
"""Named decoders (training's ``denoiser.decoder_preset``)."""


@dataclass(frozen=True)
class LangMambaConfig(_Serialisable):
    """Architecture of :class:`~langmamba.models.denoiser.LangMamba`: the frozen LangAE and the decoder.

    Attributes:
        langae_config: the stage-1 LangAE.
        decoder: the trainable Mamba U-decoder.
        langae_decoder: keep the LangAE's image decoder (inference checkpoints drop it).
    """

    langae_config: LangAEConfig = field(default_factory=LangAEConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    langae_decoder: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LangMambaConfig:
        """Reads :meth:`to_dict`'s form and the older flat form (decoder keys beside ``langae_config``)."""
        values = dict(values)
        decoder_keys = {f.name for f in dataclasses.fields(DecoderConfig)}
        flat = {k: values.pop(k) for k in list(values) if k in decoder_keys}
        decoder = values.pop("decoder", {})
        if isinstance(decoder, DecoderConfig):
            decoder = decoder.to_dict()
        langae = values.pop("langae_config", {})
        if isinstance(langae, LangAEConfig):
            langae = langae.to_dict()
        unknown = sorted(set(values) - {"langae_decoder"})
        if unknown:
            raise ConfigError(f"LangMambaConfig: unknown key(s) {', '.join(unknown)}")
        return cls(
            langae_config=LangAEConfig.from_dict(langae),
            decoder=DecoderConfig.from_dict({**decoder, **flat}),
            langae_decoder=bool(values.get("langae_decoder", True)),
        )
