"""Training configurations: typed dataclasses loaded from YAML plus ``section.key=value`` overrides.

Unknown keys and wrongly typed values raise :class:`~langmamba.errors.ConfigError` naming the key, so a typo in
a YAML file fails at start-up instead of silently training something else. Keys of removed features
(:data:`RETIRED_KEYS`) are accepted and ignored with a ``FutureWarning``, so the configs of earlier runs still load.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError

RETIRED_KEYS = {
    "data.fresh_noise_every": "every training batch gets fresh simulated noise",
    "langae.adversarial_weight": "the adversarial (PatchGAN) term was never used in training and is removed",
    "langae.adversarial_start_step": "the adversarial (PatchGAN) term was never used in training and is removed",
}
"""Keys earlier configs may hold, with why they are ignored now."""

if typing.TYPE_CHECKING:
    from ..models.config import DecoderConfig

logger = logging.getLogger(__name__)

MODELS = ("langae", "langmamba", "redcnn")
"""Trainable models: the stage-1 LangAE, the stage-2 denoiser (LangMamba) and the RED-CNN baseline."""
_RENAMED_MODELS = {"seed": "langmamba"}
_RENAMED_SECTIONS = {"seed": "denoiser"}


@dataclass
class DataConfig:
    """Where the normal-dose (and, for real pairs, low-dose) slices come from and how patches are drawn.

    ``source``: ``cases`` (every training and validation case of :mod:`langmamba.data.cases`, body-cropped, with
    its fixed split role; never lung2), ``builtin`` (the lung1 sample scan + pydicom-data's real CT slices), ``volumes``
    (normal-dose CT files/folders listed in ``volumes``, low dose simulated), ``npy`` (``<root>/train/
    {quarter_1mm,full_1mm}/*.npy``), ``mayo`` (``<root>/<patient>/{quarter*,full*}/`` DICOM/IMA) or
    ``prepared`` (``root`` = an ``.npz`` written by ``langmamba prepare-data``, with candidate words).

    Every training batch gets fresh simulated noise on the training device: ``batch_size / patches_per_slice``
    whole slices are simulated at a dose drawn uniformly from ``[dose, dose_max]`` (``dose`` alone when
    ``dose_max`` is unset) and ``patches_per_slice`` body patches are cut from each. Validation scores are
    averaged over ``validation_doses`` (noise drawn once, with a fixed seed). When the slices carry a split
    role (a prepared set of the data issue), training uses the ``train`` role and validation the
    ``validation`` role; ``lung2`` (the test case) is never used.
    """

    source: str = "builtin"
    root: str | None = None
    volumes: list[str] = field(default_factory=list)
    include_pydicom: bool = True
    dose: float = 0.25
    dose_max: float | None = None
    patch_size: int = 256
    patches_per_slice: int = 2
    validation_doses: list[float] = field(default_factory=lambda: [0.25])
    validation_patients: list[str] | None = None
    validation_fraction: float = 0.2
    max_slices_per_patient: int | None = None
    crop: int | None = None
    # source=cases: keep every k-th slice of a case (RIDER's 1.25 mm slices to 5 mm; noise is independent per slice,
    # anatomy nearly repeats) and crop each slice to the body's bounding box + margin, at least crop_min_px a side.
    slice_step: dict[str, int] = field(default_factory=lambda: {"rider": 4})
    crop_margin_px: int = 16
    crop_min_px: int = 256
    # Scanner-appearance augmentation of the simulated slices (langmamba.train.appearance): a zoom factor per
    # batch, log-uniform in [min, max] (pixel spacing divided by it; null: none; an enlarged slice gives
    # patches_per_slice * zoom² patches, so fewer slices are simulated), and per slice a Gaussian blur of
    # soften_sigma_mm (uniform in [min, max]) with probability soften_probability.
    zoom: list[float] | None = None
    soften_probability: float = 0.0
    soften_sigma_mm: list[float] = field(default_factory=lambda: [0.3, 1.0])


@dataclass
class OptimConfig:
    steps: int = 4000
    batch_size: int = 16
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999


@dataclass
class RunConfig:
    output: str = "runs/train"
    seed: int = 0
    device: str = "auto"
    bf16: bool = True
    log_every: int = 20
    validate_every: int = 500
    checkpoint_every: int = 500
    validation_slices: int = 8
    max_minutes: float | None = None
    # A model folder (e.g. an exported run of the same architecture) whose weights start a fresh run: training
    # continues across machines that kept only the exported weights (the optimizer starts anew).
    init_from: str | None = None


@dataclass
class LangAETrainConfig:
    """Section ``langae``: the stage-1 LangAE to train (architecture, language space, loss weights)."""

    vlm_backend: str = "offline"
    vlm_model: str | None = None
    vocabulary: str | None = None
    word_thresholds: list[float] = field(default_factory=lambda: [0.95, 0.90, 0.80])
    base_channels: int = 64
    channel_multipliers: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])
    num_res_blocks: int = 1
    z_channels: int = 256
    l1_weight: float = 1.0
    perceptual_weight: float = 1.0
    commitment_weight: float = 1.0
    semantic_weight: float = 1.0
    # The residual quantizer (langmamba.models.residual_quantizer); "average" trains the first checkpoints' kind.
    quantizer: str = "average"
    region_sizes: list[int] = field(default_factory=lambda: [8, 4, 2])
    detail_dim: int = 16
    detail_stages: int = 8
    detail_groups: int = 1
    # Reduce the latent to the span the word and detail codes reach (ResidualLanguageQuantizer.project_latent).
    project_latent: bool = False
    logit_scale: float = 10.0
    # Share of each batch that autoencodes low-dose patches (their regions read their normal-dose partner's
    # tissue); the rest are normal-dose crops with tissue and lesion word targets.
    low_dose_fraction: float = 0.25


@dataclass
class DenoiserTrainConfig:
    """Section ``denoiser`` (``seed`` before): LangMamba's stage-2 decoder on a frozen LangAE checkpoint.

    The decoder is :class:`~langmamba.models.config.DecoderConfig` ``decoder_preset`` with the keys of
    ``decoder`` overriding single fields; ``global_residual`` overrides the preset's.
    """

    langae: str = "weights/langae"
    langda_weight: float = 1.0
    global_residual: bool = True
    decoder_preset: str = "fast"
    decoder: dict[str, Any] = field(default_factory=dict)


@dataclass
class REDCNNConfig:
    channels: int = 96


@dataclass
class TrainConfig:
    """One training run: ``model`` is ``langae``, ``langmamba`` (the stage-2 denoiser) or ``redcnn``."""

    model: str = "langae"
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    langae: LangAETrainConfig = field(default_factory=LangAETrainConfig)
    denoiser: DenoiserTrainConfig = field(default_factory=DenoiserTrainConfig)
    redcnn: REDCNNConfig = field(default_factory=REDCNNConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check ``value`` against a (simple) type annotation; ints are accepted where floats are expected."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and not isinstance(value, bool):
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as text
            try:
                return float(value)
            except ValueError:
                pass
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation in (float, str) and not isinstance(value, annotation):
        raise ConfigError(f"{key}: expected a {annotation.__name__}, got {value!r}")
    return value


def _build(cls: type, values: dict, prefix: str = "") -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in sorted(k for k in values if prefix + str(k) in RETIRED_KEYS):
        warnings.warn(f"config key {prefix}{key} is ignored: {RETIRED_KEYS[prefix + key]}", FutureWarning, stacklevel=3)
    values = {k: v for k, v in values.items() if prefix + str(k) not in RETIRED_KEYS}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(prefix + k for k in unknown)}; known: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in values.items():
        annotation = hints[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = _build(annotation, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, annotation, prefix + name)
    return cls(**kwargs)


def decoder_config(section: DenoiserTrainConfig) -> DecoderConfig:
    """The decoder a ``denoiser`` section asks for: its preset, ``global_residual``, then ``decoder``'s keys."""
    from ..models.config import DecoderConfig

    preset = DecoderConfig.preset(section.decoder_preset)
    return preset.replace(global_residual=section.global_residual, **section.decoder)


def _deprecated(message: str) -> None:
    """A DeprecationWarning for callers, and a log line for command-line users (who do not see the warning)."""
    warnings.warn(message, DeprecationWarning, stacklevel=4)
    logger.warning("deprecated: %s", message)


def _rename_deprecated(values: dict[str, Any]) -> None:
    """Old names (``model: seed``, a ``seed:`` section) to the new ones, with a DeprecationWarning."""
    old_model = values.get("model")
    if isinstance(old_model, str) and old_model in _RENAMED_MODELS:
        new = _RENAMED_MODELS[old_model]
        _deprecated(f"model {old_model!r} is now called {new!r}")
        values["model"] = new
    for old, new in _RENAMED_SECTIONS.items():
        if old in values:
            _deprecated(f"config section {old!r} is now called {new!r} ({old}.KEY -> {new}.KEY)")
            section = values.pop(old) or {}
            if not isinstance(section, dict):
                raise ConfigError(f"{old}: expected a mapping, got {section!r}")
            values[new] = {**section, **(values.get(new) or {})}


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def validate(config: TrainConfig) -> TrainConfig:
    """Checks that need several fields at once."""
    if config.model not in MODELS:
        raise ConfigError(f"model: expected {', '.join(MODELS)}, got {config.model!r}")
    if config.data.source not in ("cases", "builtin", "volumes", "npy", "mayo", "prepared"):
        raise ConfigError(
            f"data.source: expected cases, builtin, volumes, npy, mayo or prepared, got {config.data.source!r}"
        )
    if config.data.source in ("npy", "mayo", "prepared") and not config.data.root:
        raise ConfigError(f"data.root is required for data.source={config.data.source}")
    if config.data.source == "volumes" and not config.data.volumes:
        raise ConfigError("data.volumes must list normal-dose CT files or folders for data.source=volumes")
    if not 0 < config.data.dose <= 1:
        raise ConfigError(f"data.dose must be in (0, 1], got {config.data.dose}")
    if config.data.dose_max is not None and not config.data.dose <= config.data.dose_max <= 1:
        raise ConfigError(f"data.dose_max must be in [data.dose, 1], got {config.data.dose_max}")
    zoom = config.data.zoom
    if zoom is not None and not (len(zoom) == 2 and 0 < zoom[0] <= zoom[1]):
        raise ConfigError(f"data.zoom must be [min, max] with 0 < min <= max (or null), got {zoom}")
    if not 0 <= config.data.soften_probability <= 1:
        raise ConfigError(f"data.soften_probability must be in [0, 1], got {config.data.soften_probability}")
    sigma = config.data.soften_sigma_mm
    if not (len(sigma) == 2 and 0 <= sigma[0] <= sigma[1]):
        raise ConfigError(f"data.soften_sigma_mm must be [min, max] mm with 0 <= min <= max, got {sigma}")
    if config.data.patch_size % 16 or config.data.patch_size < 64:
        raise ConfigError(f"data.patch_size must be a multiple of 16 and at least 64, got {config.data.patch_size}")
    if config.data.patches_per_slice < 1:
        raise ConfigError(f"data.patches_per_slice must be at least 1, got {config.data.patches_per_slice}")
    if not config.data.validation_doses or not all(0 < d <= 1 for d in config.data.validation_doses):
        raise ConfigError(f"data.validation_doses must list doses in (0, 1], got {config.data.validation_doses}")
    if not 0 <= config.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be in [0, 1) (0 turns the average off), got {config.optim.ema_decay}")
    from ..models.config import DECODER_PRESETS

    if config.denoiser.decoder_preset not in DECODER_PRESETS:
        raise ConfigError(
            f"denoiser.decoder_preset: expected one of {', '.join(DECODER_PRESETS)}, "
            f"got {config.denoiser.decoder_preset!r}"
        )
    try:
        decoder_config(config.denoiser)
    except ConfigError as error:
        raise ConfigError(f"denoiser.decoder: {error}") from None
    for name in ("steps", "batch_size"):
        if getattr(config.optim, name) < 1:
            raise ConfigError(f"optim.{name} must be at least 1")
    if config.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {config.optim.lr}")
    if len(config.langae.word_thresholds) != 3:
        raise ConfigError("langae.word_thresholds needs one threshold per pyramid level (3)")
    if config.langae.quantizer not in ("average", "residual"):
        raise ConfigError(f"langae.quantizer: expected average or residual, got {config.langae.quantizer!r}")
    if not config.langae.region_sizes or min(config.langae.region_sizes) < 1:
        raise ConfigError("langae.region_sizes must list positive region sizes (latent cells), coarse to fine")
    if not 0 <= config.langae.low_dose_fraction < 1:
        raise ConfigError(f"langae.low_dose_fraction must be in [0, 1), got {config.langae.low_dose_fraction}")
    return config


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, model: str | None = None
) -> TrainConfig:
    """Build a :class:`TrainConfig` from an optional YAML file, then apply ``section.key=value`` overrides."""
    values: dict = {}
    if path is not None:
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    if model is not None:
        values["model"] = model
    for override in overrides or []:
        keys, value = _parse_override(override)
        node = values
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {override!r}: {key} is not a section")
        node[keys[-1]] = value
    _rename_deprecated(values)
    return validate(_build(TrainConfig, values))
