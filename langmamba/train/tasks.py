"""The three trainable models as tasks of the shared loop: LangAE (stage 1), SEED (stage 2), RED-CNN (baseline)."""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch.nn import functional as F

from ..baselines import REDCNN
from ..checkpoint import load_checkpoint
from ..errors import ConfigError
from ..losses import seed_loss, stage1_loss
from ..models.langae import LangAE
from .config import TrainConfig
from .data import TrainingData

logger = logging.getLogger(__name__)


def _crop16(x: torch.Tensor) -> torch.Tensor:
    return x[..., : x.shape[-2] // 16 * 16, : x.shape[-1] // 16 * 16]


class LangAETask:
    """Stage 1: reconstruct normal-dose patches through the pyramid word quantizer."""

    metric_name = "reconstruction"

    def __init__(self, config: TrainConfig, data: TrainingData, device: torch.device) -> None:
        c = config.langae
        if data.language is None:
            from ..vlm import load_language_space, select_words

            space = load_language_space(c.vlm_backend, c.vlm_model, c.vocabulary)
            words = select_words(space, [s.full for s in data.train], c.word_thresholds,
                                 labels=[s.label if s.label is not None else np.zeros(s.full.shape, bool)
                                         for s in data.train], progress=True)
            for s, per_level in zip(data.train, words):
                s.words = per_level
            codebook, vocabulary, identity = space.codebook(), space.vocabulary, space.describe()
        else:
            codebook = torch.as_tensor(data.language["codebook"])
            vocabulary, identity = data.language["vocabulary"], data.language["describe"]
        self.model = LangAE(codebook=codebook, vocabulary=vocabulary, vlm_backend=identity.get("backend"),
                            vlm_id=identity.get("model"), base_channels=c.base_channels,
                            channel_multipliers=c.channel_multipliers, num_res_blocks=c.num_res_blocks,
                            z_channels=c.z_channels)
        # (slices, V) candidate mask per pyramid level, indexed by the slice each patch came from.
        self.candidates = []
        for level in range(3):
            mask = torch.zeros(len(data.train), len(vocabulary), dtype=torch.bool)
            for index, s in enumerate(data.train):
                mask[index, torch.as_tensor(s.words[level])] = True
            self.candidates.append(mask.to(device))
        self.weights = c
        self.discriminator = None

    def loss(self, module, low, full, which, step):
        index = torch.as_tensor(which, device=full.device)
        candidates = [mask[index] for mask in self.candidates]
        reconstruction, quantized = module(full, candidates)
        c = self.weights
        return stage1_loss(reconstruction, full, quantized, l1_weight=c.l1_weight,
                           perceptual_weight=c.perceptual_weight, commitment_weight=c.commitment_weight,
                           semantic_weight=c.semantic_weight)

    def predict(self, model, low, full):
        reconstruction, _ = model(_crop16(full))
        return reconstruction


class SeedTask:
    """Stage 2: denoise low-dose patches with SEED on the frozen LangAE; pixel MSE + ``seed.langda_weight`` × LangDA.

    The decoder is ``seed.decoder_preset`` (see :data:`langmamba.models.seed.DECODER_PRESETS`) with the keys of
    ``seed.decoder`` overriding it. The model is blind to the dose: it sees only the low-dose patch.
    """

    metric_name = "denoising"

    def __init__(self, config: TrainConfig, data: TrainingData, device: torch.device) -> None:
        from ..models.seed import DECODER_PRESETS, LangMamba

        langae = load_checkpoint(config.seed.langae)
        if not isinstance(langae, LangAE):
            raise ConfigError(f"seed.langae must be a LangAE checkpoint, {config.seed.langae} holds "
                              f"{type(langae).__name__}")
        decoder = dict(DECODER_PRESETS[config.seed.decoder_preset]) | config.seed.decoder
        self.model = LangMamba.from_langae(langae, global_residual=config.seed.global_residual, **decoder)
        self.langda_weight = config.seed.langda_weight

    def loss(self, module, low, full, which, step):
        prediction = module(low)
        # LangDA runs through the frozen LangAE inside the model: it is on the training device.
        return seed_loss(prediction, full, self.model.langae, langda_weight=self.langda_weight)

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


TASKS = {"langae": LangAETask, "seed": SeedTask, "redcnn": REDCNNTask}


def build_task(config: TrainConfig, data: TrainingData, device: torch.device):
    return TASKS[config.model](config, data, device)
