"""Networks of LangMamba: the language-quantized autoencoder (stage 1) and its building blocks."""

from langmamba.models.langae import LangAE
from langmamba.models.quantizer import PyramidLanguageQuantizer, QuantizerOutput, word_scores

__all__ = ["LangAE", "PyramidLanguageQuantizer", "QuantizerOutput", "word_scores"]
