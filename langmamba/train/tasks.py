"""The three trainable models as tasks of the shared loop: LangAE (stage 1), LangMamba (stage 2), RED-CNN
(baseline)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.nn import functional as F

from ..baselines import REDCNN
from ..checkpoint import load_checkpoint
from ..errors import ConfigError
from ..losses import denoising_loss, stage1_loss
from ..models.config import LangAEConfig
from ..models.langae import LangAE
from ..normalization import model_to_hu
from ..vlm.regions import classify_hu
from .config import LangAETrainConfig, TrainConfig, decoder_config
from .data import TrainingData

logger = logging.getLogger(__name__)


def langae_architecture(section: LangAETrainConfig) -> LangAEConfig:
    """The LangAE architecture of a ``langae`` training section (codebook sizes come from the tensors)."""
    return LangAEConfig(
        base_channels=section.base_channels,
        channel_multipliers=tuple(section.channel_multipliers),
        num_res_blocks=section.num_res_blocks,
        z_channels=section.z_channels,
        quantizer=section.quantizer,
        region_sizes=tuple(section.region_sizes),
        detail_stages=section.detail_stages,
        detail_groups=section.detail_groups,
        project_latent=section.project_latent,
        logit_scale=section.logit_scale,
    )


def _crop16(x: torch.Tensor) -> torch.Tensor:
    return x[..., : x.shape[-2] // 16 * 16, : x.shape[-1] // 16 * 16]


class LangAETask:
    """Stage 1: reconstruct patches through the word quantizer.

    ``langae.quantizer: average`` trains the first checkpoints' kind (normal-dose patches, per-slice candidate
    words). ``residual`` (:class:`ResidualLangAETask`) is the language space that keeps the image.
    """

    metric_name = "reconstruction"

    def __init__(self, config: TrainConfig, data: TrainingData, device: torch.device) -> None:
        c = config.langae
        if data.language is None:
            from ..vlm import load_language_space, select_words

            space = load_language_space(c.vlm_backend, c.vlm_model, c.vocabulary)
            words = select_words(
                space,
                [s.full for s in data.train],
                c.word_thresholds,
                labels=[s.label if s.label is not None else np.zeros(s.full.shape, bool) for s in data.train],
                progress=True,
            )
            for s, per_level in zip(data.train, words):
                s.words = per_level
            codebook, vocabulary, identity = space.codebook(), space.vocabulary, space.describe()
        else:
            codebook = torch.as_tensor(data.language["codebook"])
            vocabulary, identity = data.language["vocabulary"], data.language["describe"]
        self.model = LangAE(
            langae_architecture(c),
            codebook=codebook,
            vocabulary=vocabulary,
            vlm_backend=identity.get("backend"),
            vlm_id=identity.get("model"),
        )
        # (slices, V) candidate mask per pyramid level, indexed by the slice each patch came from.
        self.candidates = []
        for level in range(3):
            mask = torch.zeros(len(data.train), len(vocabulary), dtype=torch.bool)
            for index, s in enumerate(data.train):
                mask[index, torch.as_tensor(s.words[level])] = True
            self.candidates.append(mask.to(device))
        self.weights = c

    def loss(self, module, low, full, which, step):
        index = torch.as_tensor(which, device=full.device)
        candidates = [mask[index] for mask in self.candidates]
        reconstruction, quantized = module(full, candidates)
        return self.stage1_loss(reconstruction, full, quantized)

    def stage1_loss(self, reconstruction, target, quantized):
        """:func:`langmamba.losses.stage1_loss` with this run's ``langae.*_weight`` settings."""
        c = self.weights
        return stage1_loss(
            reconstruction,
            target,
            quantized,
            l1_weight=c.l1_weight,
            perceptual_weight=c.perceptual_weight,
            commitment_weight=c.commitment_weight,
            semantic_weight=c.semantic_weight,
        )

    def predict(self, model, low, full):
        reconstruction, _ = model(_crop16(full))
        return reconstruction


def _detail_codes(c, region) -> tuple[torch.Tensor, torch.Tensor]:
    """Token codes of the language model behind the region vocabulary (packaged for MiniLM)."""
    from ..vlm.token_codes import MINILM_CODES_DIM, MINILM_DIRECTIONS, minilm_codes, principal_codes

    if (
        c.vlm_backend == "offline"
        and c.vlm_model is None
        and c.detail_dim <= MINILM_CODES_DIM
        and c.detail_dim * c.detail_groups <= MINILM_DIRECTIONS
    ):
        return minilm_codes(c.detail_dim, c.detail_groups)
    if region.space is None:
        raise ConfigError(f"the {c.vlm_backend} language model is needed for its token table (detail codes)")
    return principal_codes(region.space.token_table(), c.detail_dim, c.detail_groups)


def code_perplexity(ids: torch.Tensor, size: int) -> torch.Tensor:
    """``exp(entropy)`` of the token histogram of ``ids``: how many codes are in effective use (scalar)."""
    counts = torch.bincount(ids.reshape(-1), minlength=size).float()
    p = counts / counts.sum().clamp_min(1)
    return torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())


class ResidualLangAETask(LangAETask):
    """Stage 1 with the residual quantizer: normal-dose crops with region word targets, plus low-dose patches.

    Every batch holds ``optim.batch_size`` images: a ``langae.low_dose_fraction`` share of the loop's low-dose
    patches, whose regions get the tissue words of their normal-dose partner, and normal-dose crops from
    :class:`RegionCrops`, whose regions get the candidate words of their own HU composition and lesion
    overlap (:mod:`langmamba.vlm.regions`). Each image reconstructs itself.
    """

    def __init__(self, config: TrainConfig, data: TrainingData, device: torch.device) -> None:
        from ..vlm.region_vocabulary import load_region_language
        from ..vlm.regions import REGION_CLASSES, class_word_masks
        from .region_crops import RegionCrops

        c = config.langae
        region = load_region_language(c.vocabulary, c.vlm_backend, c.vlm_model)
        detail_codes, projection = _detail_codes(c, region)
        architecture = langae_architecture(c).replace(normalize_latent=False, word_classes=list(region.classes))
        self.model = LangAE(
            architecture,
            codebook=region.codebook,
            vocabulary=region.words,
            vlm_backend=region.describe.get("backend"),
            vlm_id=region.describe.get("model"),
            detail_codebook=detail_codes,
            detail_projection=projection,
        )
        self.per_class, self.lesion_words = class_word_masks(region.classes, device)
        self.classes = len(REGION_CLASSES)
        self.crops = RegionCrops(data.train, config.data.patch_size, device, seed=config.run.seed + 17)
        self.low_count = int(round(c.low_dose_fraction * config.optim.batch_size))
        self.crop_count = config.optim.batch_size - self.low_count
        self.weights = c
        logger.info(
            "residual LangAE: %d region words, %d detail codes of dimension %d, %d training slices",
            len(region.words),
            detail_codes.shape[0],
            detail_codes.shape[1],
            len(self.crops),
        )

    def region_candidates(
        self, classes: torch.Tensor, lesion: torch.Tensor, has_label: torch.Tensor
    ) -> list[torch.Tensor]:
        """Candidate masks ``(B, g_h, g_w, V)`` per word level of crops with class maps ``(B, P, P)``."""
        from ..vlm.regions import candidate_words, region_fractions

        factor = self.model.downsample_factor
        out = []
        for size in self.model.quantizer.region_sizes:
            fractions = region_fractions(classes, size * factor, self.classes)
            lesion_fraction = region_fractions(lesion, size * factor) * has_label[:, None, None]
            out.append(candidate_words(fractions, lesion_fraction, self.per_class, self.lesion_words))
        return out

    def loss(self, module, low, full, which, step):
        image, classes, lesion, has_label = self.crops.sample(self.crop_count)
        candidates = self.region_candidates(classes, lesion, has_label)
        inputs = image.to(full.dtype)
        if self.low_count:
            noisy = low[: self.low_count]
            if noisy.shape[-2:] != image.shape[-2:]:
                raise ConfigError(
                    f"low-dose patches {tuple(noisy.shape[-2:])} and crops {tuple(image.shape[-2:])} differ in size"
                )
            # The low-dose patches read the tissue of their normal-dose partner (same place): words that do not
            # follow the noise. Their body mask comes from the patch (exact for whole slices); no lesion words.
            partner = classify_hu(model_to_hu(full[: self.low_count, 0].float()))
            no_lesion = torch.zeros(self.low_count, device=full.device, dtype=torch.bool)
            low_candidates = self.region_candidates(partner, torch.zeros_like(partner, dtype=torch.float32), no_lesion)
            inputs = torch.cat([noisy, inputs])
            candidates = [torch.cat([a, b]) for a, b in zip(low_candidates, candidates)]
        reconstruction, quantized = module(inputs, candidates)
        total, parts = self.stage1_loss(reconstruction, inputs, quantized)
        parts["coarse_perplexity"] = code_perplexity(quantized.token_ids[0], self.model.quantizer.codebook_size)
        return total, parts

    def predict(self, model, low, full):
        factor = model.downsample_factor
        reconstruction, _ = model(full[..., : full.shape[-2] // factor * factor, : full.shape[-1] // factor * factor])
        return reconstruction


class DenoiserTask:
    """Stage 2: denoise low-dose patches with LangMamba's decoder on the frozen LangAE; pixel MSE +
    ``denoiser.langda_weight`` × LangDA.

    The decoder is :func:`~langmamba.train.config.decoder_config` of the ``denoiser`` section (a preset of
    :data:`langmamba.models.config.DECODER_PRESETS` with single fields overridden). The model is blind to the
    dose: it sees only the low-dose patch.
    """

    metric_name = "denoising"

    def __init__(self, config: TrainConfig, data: TrainingData, device: torch.device) -> None:
        from ..models.denoiser import LangMamba

        langae = load_checkpoint(config.denoiser.langae)
        if not isinstance(langae, LangAE):
            raise ConfigError(
                f"denoiser.langae must be a LangAE checkpoint, {config.denoiser.langae} holds {type(langae).__name__}"
            )
        self.model = LangMamba.from_langae(langae, decoder_config(config.denoiser))
        self.langda_weight = config.denoiser.langda_weight

    def loss(self, module, low, full, which, step):
        prediction = module(low)
        # LangDA runs through the frozen LangAE inside the model: it is on the training device.
        return denoising_loss(prediction, full, self.model.langae, langda_weight=self.langda_weight)

    def predict(self, model, low, full):
        return model(low)


class REDCNNTask:
    """Baseline: RED-CNN with the same data and budget, pixel MSE."""

    metric_name = "denoising"

    def __init__(self, config: TrainConfig, data: TrainingData, device: torch.device) -> None:
        self.model = REDCNN(channels=config.redcnn.channels)

    def loss(self, module, low, full, which, step):
        mse = F.mse_loss(module(low), full)
        return mse, {"mse": mse.detach()}

    def predict(self, model, low, full):
        return model(low)


TASKS = {"langae": LangAETask, "langmamba": DenoiserTask, "redcnn": REDCNNTask}


def build_task(config: TrainConfig, data: TrainingData, device: torch.device):
    if config.model == "langae" and config.langae.quantizer == "residual":
        return ResidualLangAETask(config, data, device)
    return TASKS[config.model](config, data, device)
