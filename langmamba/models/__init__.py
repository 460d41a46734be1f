"""Networks of LangMamba: the language-quantized autoencoder (stage 1), the denoiser (stage 2) and their
architecture configs."""

from langmamba.models.config import DECODER_PRESETS, DecoderConfig, LangAEConfig, LangMambaConfig
from langmamba.models.denoiser import DenoiserDecoder, LangMamba
from langmamba.models.langae import LangAE
from langmamba.models.quantizer import PyramidLanguageQuantizer, QuantizerOutput, word_scores

__all__ = [
    "DECODER_PRESETS",
    "DecoderConfig",
    "DenoiserDecoder",
    "LangAE",
    "LangAEConfig",
    "LangMamba",
    "LangMambaConfig",
    "PyramidLanguageQuantizer",
    "QuantizerOutput",
    "word_scores",
]
