"""How to read the words of an explanation: probabilities, change flags, language space.

The rules the explainer applies and records in the explanation document, in one place so the evaluation and the
displays use the same ones (the confidence bands are :mod:`langmamba.explain.confidence`'s):

- :func:`word_probabilities`: a region latent's probability for every vocabulary word, with the quantizer's
  calibration (its own ``word_probabilities`` or ``logit_scale`` when it has one; else a softmax of negative
  squared codebook distances at temperature 1), and :func:`score_record`, what the document says about it;
- :class:`ChangeRule` / :func:`change_flags`: when denoising counts as having changed a region's word;
- :func:`language_space_record`: which language space produced the words; :func:`resolve_word_classes`: each
  word's tissue class, when the model or the caller has them.

Every name is re-exported by :mod:`langmamba.explain` (``langmamba.explain.change_flags`` ...).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from langmamba.errors import ConfigError, InputError
from langmamba.models.quantizer import squared_distances

WORD_CLASS_KEYS = ("word_classes", "vocabulary_classes")
"""Attributes (of the LangAE or the model) and checkpoint config keys (top level, ``model_config``, ``extra``)
that may hold each word's tissue class: a word -> class mapping or a list in vocabulary order."""


@dataclass(frozen=True)
class ChangeRule:
    """When denoising counts as having changed what a region shows: the document's ``changed`` flag.

    With ``p`` the output's and ``q`` the input's word probabilities over the whole vocabulary, ``a`` the
    output's top word and ``b`` the input's, a region is flagged when all of

    - ``a != b`` (the top word changed),
    - ``p[a] >= min_probability`` and ``q[b] >= min_probability`` (each image reads its word with confidence),
    - ``p[a] - p[b] >= min_margin`` and ``q[b] - q[a] >= min_margin`` (each image prefers its own word to the
      other's by the margin)

    hold. ``ChangeRule(0.0, 0.0)`` flags every change of the top word (schema 1.0's flag). With near-uniform
    probabilities (0.3 % per word over 314 words) nothing is flagged: a 1e-4 reshuffle of near-equal scores is
    noise, not a change of tissue.

    Args:
        min_probability: the least top-word probability of both images, in [0, 1].
        min_margin: the least lead of each image's top word over the other image's, in [0, 1].
    """

    min_probability: float = 0.3
    min_margin: float = 0.1

    def __post_init__(self) -> None:
        for name in ("min_probability", "min_margin"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"ChangeRule.{name} must be a probability in [0, 1], got {value!r}")

    def record(self) -> dict[str, Any]:
        """The rule as the document's ``change_rule`` entry."""
        return {
            "name": "confident_top_word_change",
            "min_probability": float(self.min_probability),
            "min_margin": float(self.min_margin),
            "description": (
                f"flagged when the top word differs, both top words have probability >= {self.min_probability:g} "
                f"and each image prefers its own top word to the other's by >= {self.min_margin:g}"
            ),
        }


DEFAULT_CHANGE_RULE = ChangeRule()


def rule_flags(p: torch.Tensor, q: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rule: ChangeRule) -> torch.Tensor:
    """``(N,)`` :class:`ChangeRule` flags of output and input probabilities ``p``, ``q`` ``(N, V)`` given their top
    word ids ``a`` and ``b`` ``(N, 1)`` (e.g. from ``topk``, so ties resolve as the listed top words do)."""
    pa, pb, qa, qb = p.gather(1, a), p.gather(1, b), q.gather(1, a), q.gather(1, b)
    flags = (
        (a != b)
        & (pa >= rule.min_probability)
        & (qb >= rule.min_probability)
        & (pa - pb >= rule.min_margin)
        & (qb - qa >= rule.min_margin)
    )
    return flags[:, 0]


def change_flags(
    output_probabilities: npt.ArrayLike | torch.Tensor,
    input_probabilities: npt.ArrayLike | torch.Tensor,
    rule: ChangeRule = DEFAULT_CHANGE_RULE,
) -> npt.NDArray[np.bool_] | torch.Tensor:
    """Which regions :class:`ChangeRule` flags as changed by denoising.

    Args:
        output_probabilities: ``(..., V)`` word probabilities of the regions in the denoised output.
        input_probabilities: ``(..., V)`` the same regions' word probabilities in the input.
        rule: the thresholds (default :data:`DEFAULT_CHANGE_RULE`).

    Returns:
        ``(...)`` booleans, a numpy array unless ``output_probabilities`` is a tensor.
    """
    as_tensor = isinstance(output_probabilities, torch.Tensor)
    p = torch.as_tensor(output_probabilities).detach().float()
    q = torch.as_tensor(input_probabilities).detach().float().to(p.device)
    if p.shape != q.shape or p.ndim < 1 or p.shape[-1] < 1:
        raise InputError(
            f"output and input probabilities must have the same (..., V) shape, got "
            f"{tuple(p.shape)} and {tuple(q.shape)}"
        )
    lead = p.shape[:-1]
    p, q = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    flags = rule_flags(p, q, p.argmax(dim=1, keepdim=True), q.argmax(dim=1, keepdim=True), rule).reshape(lead)
    return flags if as_tensor else flags.cpu().numpy()


def _logit_scale(quantizer: nn.Module) -> float | None:
    scale = getattr(quantizer, "logit_scale", None)
    if scale is None:
        return None
    return float(scale.detach().float().reshape(()).item()) if isinstance(scale, torch.Tensor) else float(scale)


def word_probabilities(
    quantizer: nn.Module, vectors: torch.Tensor, codebook: torch.Tensor | None = None, level: int = 0
) -> torch.Tensor:
    """Word probabilities of pyramid level ``level``'s region latents ``vectors (N, E)`` -> ``(N, V)``, rows
    summing to 1.

    The quantizer's own ``word_probabilities(vectors, level)`` when it is ``calibrated`` (the temperature may
    differ per level); else the softmax of negative squared codebook distances times the quantizer's
    ``logit_scale`` (1 when it has none), as the semantic loss scores.
    """
    own = getattr(quantizer, "word_probabilities", None)
    if getattr(quantizer, "calibrated", False) and callable(own):
        probabilities: torch.Tensor = own(vectors, level).float()
        return probabilities
    if codebook is None:
        codebook = cast(torch.Tensor, quantizer.codebook)
    scale = _logit_scale(quantizer)
    return torch.softmax(-(1.0 if scale is None else scale) * squared_distances(vectors, codebook), dim=-1)


def score_record(quantizer: nn.Module) -> dict[str, Any]:
    """The document's ``scores`` entry: the method and which calibration :func:`word_probabilities` applies."""
    scale = _logit_scale(quantizer)
    if getattr(quantizer, "calibrated", False):  # the quantizer's own word_probabilities are calibrated
        calibration = "model"
    else:
        calibration = "none" if scale is None else "logit_scale"
    return {
        "method": "softmax_negative_squared_distance",
        "calibration": calibration,
        "logit_scale": None if scale is None else round(scale, 6),
    }


def language_space_record(model: nn.Module) -> dict[str, Any]:
    """Which language space produced a model's words: ``backend``, ``model``, ``name``, ``description`` (a
    sentence for people), ``tissue_supervision`` and ``vocabulary_sha256``.

    Read from the space's :meth:`langmamba.vlm.LanguageSpace.describe` record when the model keeps one (a
    ``language_space`` attribute of the LangAE or the model, or ``language_space`` in the checkpoint config, its
    ``model_config`` or ``extra``), else from the ``vlm_backend``/``vlm_id`` every checkpoint records.
    """
    langae = getattr(model, "langae", model)
    config = getattr(model, "checkpoint_config", None)
    config = config if isinstance(config, dict) else {}
    described = None
    for source in (langae, model):
        space = getattr(source, "language_space", None)
        if isinstance(space, dict):
            described = space
            break
    for scope in (config, config.get("model_config", {}), config.get("extra", {})):
        if described is None and isinstance(scope, dict) and isinstance(scope.get("language_space"), dict):
            described = scope["language_space"]
    described = described or {}
    backend = described.get("backend", config.get("vlm_backend", getattr(langae, "vlm_backend", None)))
    model_id = described.get("model", config.get("vlm_id", getattr(langae, "vlm_id", None)))
    backend = None if backend is None else str(backend)
    model_id = None if model_id is None else str(model_id)
    tissue = backend == "offline" or "tissue_classes" in described
    if backend == "offline":
        text = "MiniLM" if model_id is None or "minilm" in model_id.lower() else model_id
        description = f"offline {text} text codebook ({model_id or 'all-MiniLM-L6-v2'}) with tissue-class supervision"
    elif backend == "clip":
        description = f"CLIP model {model_id}" if model_id else "a CLIP model (name not recorded)"
    elif backend is None:
        description = "not recorded by the model"
    else:
        description = f"{backend} ({model_id})" if model_id else backend
    name = described.get("name") or (f"{backend}:{model_id}" if backend and model_id else backend)
    sha = described.get("vocabulary_sha256")
    return {
        "backend": backend,
        "model": model_id,
        "name": None if name is None else str(name),
        "description": description,
        "tissue_supervision": bool(tissue),
        "vocabulary_sha256": None if sha is None else str(sha),
    }


def resolve_word_classes(
    model: nn.Module, langae: nn.Module, vocabulary: list[str], given: Mapping[str, str] | Sequence[str] | None
) -> dict[str, str] | None:
    """Each word's tissue class: ``given``, else what the LangAE, the model or the checkpoint config holds under
    :data:`WORD_CLASS_KEYS` (a word -> class mapping, or a list in vocabulary order); ``None`` when none does."""
    candidates = [given]
    config = getattr(model, "checkpoint_config", None)
    scopes = [config, config.get("model_config", {}), config.get("extra", {})] if isinstance(config, dict) else []
    for key in WORD_CLASS_KEYS:
        candidates += [getattr(langae, key, None), getattr(model, key, None)]
        candidates += [scope.get(key) for scope in scopes if isinstance(scope, dict)]
    for classes in candidates:
        if classes is None or isinstance(classes, (str, bytes)):
            continue
        if isinstance(classes, Mapping):
            return {word: classes[word] for word in vocabulary if isinstance(classes.get(word), str) and classes[word]}
        classes = list(classes)
        if len(classes) != len(vocabulary):
            raise InputError(f"{len(classes)} word classes for a vocabulary of {len(vocabulary)} words")
        return {word: c for word, c in zip(vocabulary, classes) if isinstance(c, str) and c}
    return None
