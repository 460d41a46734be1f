"""Explanations scored against ground truth nobody tuned on: the HU composition and lesion mask of each region.

Everything here needs only numpy and torch, so it runs on a GPU host from arrays (``python -m
langmamba.evaluate_explanations CASE.npz --model weights/langmamba``) as well as inside ``langmamba evaluate``,
which stores the result in ``weights/metrics.json`` under ``explanations``.

Ground truth per region of the finest word level (the explainer's regions; truth by
:mod:`langmamba.vlm.regions`, computed on the normal-dose slice): the fraction of each HU class, the dominant
class, the body fraction and the lesion fraction. A *body region* is one less than half outside air; a
*tumour region* one the lesion mask covers at least half of; a *non-tumour region* a body region with no
lesion pixel.

Metrics (each with its trivial baseline and a 95 % interval from a bootstrap over slices):

- ``tissue_agreement``: share of body regions whose top word's class equals the dominant HU class
  (normal-dose input); baseline: always the most common dominant class.
- ``calibration``: expected calibration error (15 equal-width bins) of the top word's probability against
  that agreement; the mean top-word probability on body regions; the uniform probability beside it.
- ``lesion_grounding``: share of tumour regions read as a lesion word, share of non-tumour body regions read
  as one (baseline: never a lesion word, 0 and 0).
- ``change_flags``: the explainer's own flags (:func:`langmamba.explain.explain_volume`, low-dose input
  against output). ``sensitivity``: on tumour regions, with the tumour erased from the denoised output
  (:func:`erase_lesion`); ``honest_flag_rate``: on body regions, with the denoised output as it is.
- ``stability``: agreement of the denoised output's top words with the normal dose's, minus the same for
  the low-dose input, over body regions (``gain``).
- ``reconstruction``: RMSE inside the body (HU) of the LangAE's quantized and continuous paths on the normal
  dose (baseline: the low-dose input's RMSE against it, when given); empty for a LangMamba shipped without
  the LangAE decoder (evaluate the LangAE checkpoint for it).
- ``code_usage``: distinct words and perplexity of the coarsest level's tokens on the normal dose.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from langmamba.errors import InputError
from langmamba.io.atomic import write_text
from langmamba.models.quantizer import pool_to_grid
from langmamba.normalization import hu_to_model, model_to_hu
from langmamba.runtime import resolve_device
from langmamba.vlm.regions import LESION_MAJORITY, REGION_CLASSES, body_mask, classify_hu

logger = logging.getLogger(__name__)

BOOTSTRAP_SAMPLES = 1000
ECE_BINS = 15
BODY_MAJORITY = 0.5
"""A region is a body region when outside air covers less than this fraction of it."""


# --- small statistics -----------------------------------------------------------------------------


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """``Σ_b n_b / n * |accuracy_b - confidence_b|`` over equal-width confidence bins on [0, 1]."""
    confidence = np.asarray(confidence, np.float64).ravel()
    correct = np.asarray(correct, np.float64).ravel()
    if confidence.size == 0:
        return float("nan")
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        chosen = index == b
        if chosen.any():
            total += chosen.sum() / confidence.size * abs(correct[chosen].mean() - confidence[chosen].mean())
    return float(total)


def bootstrap_interval(
    per_slice: Sequence[tuple[float, float]], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> list[float]:
    """95 % interval of a ratio ``Σ numerators / Σ denominators`` from per-slice ``(numerator, denominator)``
    pairs, resampling slices with replacement; ``[nan, nan]`` without data."""
    pairs = np.asarray(per_slice, np.float64).reshape(-1, 2)
    if pairs.shape[0] == 0 or pairs[:, 1].sum() == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, pairs.shape[0], size=(samples, pairs.shape[0]))
    num, den = pairs[picks, 0].sum(axis=1), pairs[picks, 1].sum(axis=1)
    ratios = num[den > 0] / den[den > 0]
    return [float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))]


def _ratio(pairs: list[tuple[float, float]]) -> dict:
    num = float(sum(p[0] for p in pairs))
    den = float(sum(p[1] for p in pairs))
    return {"value": num / den if den else float("nan"), "ci95": bootstrap_interval(pairs), "regions": int(den)}


def _difference(a: list[tuple[float, float]], b: list[tuple[float, float]], seed: int = 0) -> dict:
    """``ratio(a) - ratio(b)`` with a paired bootstrap over slices (same slices in a and b)."""
    pa, pb = np.asarray(a, np.float64).reshape(-1, 2), np.asarray(b, np.float64).reshape(-1, 2)
    value = pa[:, 0].sum() / max(pa[:, 1].sum(), 1) - pb[:, 0].sum() / max(pb[:, 1].sum(), 1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, pa.shape[0], size=(BOOTSTRAP_SAMPLES, pa.shape[0])) if pa.shape[0] else None
    if picks is None:
        return {"value": float("nan"), "ci95": [float("nan"), float("nan")]}
    da = pa[picks, 0].sum(1) / np.maximum(pa[picks, 1].sum(1), 1)
    db = pb[picks, 0].sum(1) / np.maximum(pb[picks, 1].sum(1), 1)
    return {"value": float(value), "ci95": [float(np.percentile(da - db, 2.5)), float(np.percentile(da - db, 97.5))]}


# --- ground truth and readings --------------------------------------------------------------------


def _langae(model: torch.nn.Module) -> torch.nn.Module:
    langae = getattr(model, "langae", model)
    if not hasattr(langae, "quantizer") or not callable(getattr(langae, "encode", None)):
        raise InputError(f"{type(model).__name__} has no LangAE; explanations need a LangMamba or LangAE")
    return langae


def word_classes(langae: torch.nn.Module) -> list[str | None]:
    """The class of every vocabulary word: the model's own, else looked up in the packaged region vocabulary."""
    classes = getattr(langae, "word_classes", None)
    if classes:
        return list(classes)
    from langmamba.vlm.vocabulary import load_word_classes

    known = load_word_classes()
    return [known.get(word) for word in (langae.vocabulary or [])] or [None] * langae.quantizer.codebook_size


def class_ids(classes: Sequence[str | None], device: str | torch.device) -> torch.Tensor:
    """Each word's index in :data:`REGION_CLASSES` ``(V,)``, ``-1`` for a word without a known class."""
    index = {name: i for i, name in enumerate(REGION_CLASSES)}
    return torch.tensor([index.get(c, -1) for c in classes], device=device)


def _pad(x: torch.Tensor, factor: int) -> torch.Tensor:
    pad_h, pad_w = -x.shape[-2] % factor, -x.shape[-1] % factor
    return F.pad(x, (0, pad_w, 0, pad_h), mode="reflect") if pad_h or pad_w else x


def region_truth(hu: torch.Tensor, lesion: torch.Tensor | None, factor: int, grid: tuple[int, int]) -> dict:
    """Per-region truth of padded slices ``(B, H, W)`` HU on a ``grid`` of ``factor``-pixel latent cells:
    ``fractions (B, g_h, g_w, K)``, ``dominant``, ``body`` (bool), ``lesion_fraction``."""
    classes = classify_hu(hu)
    one_hot = F.one_hot(classes, len(REGION_CLASSES)).permute(0, 3, 1, 2).float()
    cells = F.avg_pool2d(one_hot, factor)
    fractions = pool_to_grid(cells, grid).permute(0, 2, 3, 1)
    out = {"fractions": fractions, "dominant": fractions.argmax(dim=-1), "body": fractions[..., 0] < BODY_MAJORITY}
    if lesion is not None:
        out["lesion_fraction"] = pool_to_grid(F.avg_pool2d(lesion.float()[:, None], factor), grid)[:, 0]
    return out


@torch.no_grad()
def read_regions(langae: torch.nn.Module, hu: torch.Tensor, level: int, reconstruct: bool = True) -> dict:
    """Top word and its probability per region of one level for padded slices ``(B, H, W)`` HU, the coarsest
    level's tokens, and (where the LangAE has its decoder) the quantized and continuous reconstructions
    ``(B, H, W)`` HU."""
    x = hu_to_model(hu.float())[:, None]
    z = langae.encode(x)
    reconstruct = reconstruct and getattr(langae, "decoder", None) is not None
    out = langae.quantize(z, details=reconstruct)
    probs = langae.quantizer.word_probabilities(out.region_latents[level], level)
    top_prob, top_id = probs.max(dim=-1)
    read = {"top_id": top_id, "top_prob": top_prob, "coarse_ids": out.token_ids[0]}
    if reconstruct:
        read["quantized"] = model_to_hu(langae.decode(out.quantized)[:, 0].float())
        # The latent the decoder is trained on: z itself, or its coded part for a LangAE with project_latent.
        read["continuous"] = model_to_hu(langae.decode(out.continuous)[:, 0].float())
    return read


def erase_lesion(hu: np.ndarray, lesion: np.ndarray, margin_px: int = 2, iterations: int = 300) -> np.ndarray:
    """Replace the lesion (dilated by ``margin_px``) by surrounding tissue: the mean of the ring around it as a
    start, then harmonic (4-neighbour Jacobi) filling from the border. ``(Z, H, W)`` HU -> new array."""
    x = torch.as_tensor(np.asarray(hu, np.float32)).clone()
    mask = torch.as_tensor(np.asarray(lesion) != 0)[:, None].float()
    if margin_px:
        mask = F.max_pool2d(mask, 2 * margin_px + 1, stride=1, padding=margin_px)
    ring = F.max_pool2d(mask, 7, stride=1, padding=3) - mask
    mask, ring = mask[:, 0] > 0, ring[:, 0] > 0
    for z in range(x.shape[0]):
        if mask[z].any():
            x[z][mask[z]] = x[z][ring[z]].mean() if ring[z].any() else x[z][~mask[z]].mean()
    kernel = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]]).view(1, 1, 3, 3)
    for _ in range(iterations):
        smooth = F.conv2d(F.pad(x[:, None], (1, 1, 1, 1), mode="replicate"), kernel)[:, 0]
        x = torch.where(mask, smooth, x)
    return x.numpy()


def explainer_flags(
    model: torch.nn.Module, input_hu: np.ndarray, output_hu: np.ndarray, level: int, grid: tuple[int, int], device: str
) -> np.ndarray:
    """The explainer's ``changed`` flag per region of one level, ``(Z, g_h, g_w)`` bool, through
    :func:`langmamba.explain.explain_volume` (its rule, whatever it is)."""
    from langmamba.explain import explain_volume

    document = explain_volume(model, input_hu, output_hu, levels=[level], top_k=1, device=device)
    flags = np.zeros((input_hu.shape[0], *grid), bool)
    for entry in document["slices"]:
        for region in entry["levels"][0]["regions"]:
            flags[entry["z"], region["row"], region["col"]] = bool(region["changed"])
    return flags


# --- calibration -----------------------------------------------------------------------------------


def _golden_log_search(loss, low: float, high: float, iterations: int) -> float:
    """The ``T`` in ``[low, high]`` minimising ``loss(log T)`` (golden-section search on ``log T``)."""
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = loss(c), loss(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = loss(d)
    return math.exp((a + b) / 2)


def candidate_nll(logits: torch.Tensor, candidates: torch.Tensor, scale: float) -> float:
    """``mean(-log Σ_{v∈S} softmax(scale * logits)_v)`` over regions ``(N, V)`` with candidate masks ``(N, V)``
    (rows without candidates are ignored)."""
    keep = candidates.any(dim=-1)
    scaled = logits[keep].double() * scale
    picked = torch.logsumexp(scaled.masked_fill(~candidates[keep], float("-inf")), dim=-1)
    return float((torch.logsumexp(scaled, dim=-1) - picked).mean())


def top_probability(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """The top word's probability ``max softmax(scale * logits)`` ``(N,)`` of regions ``(N, V)`` (float64)."""
    return torch.softmax(logits.double() * scale, dim=-1).max(dim=-1).values


def top_word_bce(logits: torch.Tensor, correct: torch.Tensor, scale: float) -> float:
    """Binary cross-entropy of the top word's probability (:func:`top_probability`) over regions ``(N, V)``
    against whether that word is right ``(N,)`` (which word is on top does not depend on ``scale``)."""
    top = top_probability(logits, scale).clamp(1e-12, 1 - 1e-12)
    right = correct.double()
    return float(-(right * top.log() + (1 - right) * (1 - top).log()).mean())


def fit_temperature(
    logits: torch.Tensor, candidates: torch.Tensor, low: float = 0.05, high: float = 20.0, iterations: int = 60
) -> float:
    """The factor ``T`` minimising :func:`candidate_nll` over regions ``(N, V)`` with candidate masks ``(N, V)``."""
    if not bool(candidates.any(dim=-1).any()):
        raise InputError("no region has a candidate word to fit the temperature on")
    return _golden_log_search(lambda log_t: candidate_nll(logits, candidates, math.exp(log_t)), low, high, iterations)


def fit_top_word_temperature(
    logits: torch.Tensor, correct: torch.Tensor, low: float = 0.05, high: float = 200.0, iterations: int = 60
) -> float:
    """The factor ``T`` minimising :func:`top_word_bce`: the top word's probability then says how often a word
    read with that probability is right (temperature scaling of the shown confidence, Guo et al. 2017)."""
    if logits.shape[0] == 0:
        raise InputError("no body region to fit the temperature on")
    return _golden_log_search(lambda log_t: top_word_bce(logits, correct, math.exp(log_t)), low, high, iterations)


CALIBRATION_OBJECTIVES = ("top_word", "candidates")


@torch.no_grad()
def fit_calibration(
    model: torch.nn.Module,
    normal_hu: np.ndarray | Sequence[np.ndarray],
    lesion: np.ndarray | Sequence[np.ndarray | None] | None = None,
    *,
    objective: str = "top_word",
    batch_size: int = 4,
    device: str = "cpu",
) -> dict:
    """Fit the residual quantizer's per-level ``calibration`` on validation slices (a ``(Z, H, W)`` HU volume
    or a list of ``(H, W)`` slices, with lesion masks or ``None``; never the test volume) and set it in place.

    ``objective``: ``top_word`` (default) makes the shown top-word probability calibrated against whether the
    word's tissue class is the region's dominant HU class, on body regions (what the evaluation's ECE scores);
    ``candidates`` maximises the likelihood of each region's candidate words (the training targets).

    Returns ``{"objective", "temperature": [...], "loss_before": [...], "loss_after": [...], "regions": [...]}``
    with one entry per level; with ``top_word`` also the share of right top words (``agreement``) and the
    in-sample ``ece_before/after`` and ``mean_top_probability_before/after``.
    """
    from langmamba.vlm.regions import candidate_words, class_word_masks

    if objective not in CALIBRATION_OBJECTIVES:
        raise InputError(f"objective must be one of {', '.join(CALIBRATION_OBJECTIVES)}, got {objective!r}")
    langae = _langae(model).to(device=device, dtype=torch.float32).eval()
    quantizer = langae.quantizer
    if not hasattr(quantizer, "calibration"):
        raise InputError("only the residual quantizer has a word calibration to fit")
    factor = langae.downsample_factor
    classes = word_classes(langae)
    per_class, lesion_words = class_word_masks(classes, device)
    word_class = class_ids(classes, device)
    quantizer.calibration.fill_(1.0)
    logits: list[list[torch.Tensor]] = [[] for _ in range(quantizer.num_levels)]
    targets: list[list[torch.Tensor]] = [[] for _ in range(quantizer.num_levels)]
    same_shape = isinstance(normal_hu, np.ndarray) and np.ndim(normal_hu) == 3
    step = batch_size if same_shape else 1
    for start in range(0, len(normal_hu), step):
        chunk = np.stack([np.asarray(a, np.float32) for a in normal_hu[start : start + step]])
        hu = _pad(torch.as_tensor(chunk, device=device), factor)
        les = None
        if lesion is not None:
            masks = [
                np.zeros(a.shape, bool) if m is None else np.asarray(m) != 0
                for a, m in zip(chunk, lesion[start : start + step])
            ]
            les = _pad(torch.as_tensor(np.stack(masks), device=device).float(), factor)
        out = langae.quantize(langae.encode(hu_to_model(hu)[:, None]), details=False)
        grids = quantizer.level_grids(out.quantized.shape[-2:])
        for level, grid in enumerate(grids):
            truth = region_truth(hu, les, factor, grid)
            level_logits = quantizer.word_logits(out.region_latents[level], level)
            if objective == "top_word":
                body = truth["body"]
                right = word_class[level_logits.argmax(dim=-1)] == truth["dominant"]
                logits[level].append(level_logits[body])
                targets[level].append(right[body])
            else:
                mask = candidate_words(truth["fractions"], truth.get("lesion_fraction"), per_class, lesion_words)
                logits[level].append(level_logits.reshape(-1, mask.shape[-1]))
                targets[level].append(mask.reshape(-1, mask.shape[-1]))
    fit, loss = (
        (fit_top_word_temperature, top_word_bce) if objective == "top_word" else (fit_temperature, candidate_nll)
    )
    report: dict = {"objective": objective, "temperature": [], "loss_before": [], "loss_after": [], "regions": []}
    for level in range(quantizer.num_levels):
        lg, tg = torch.cat(logits[level]), torch.cat(targets[level])
        t = fit(lg, tg)
        quantizer.calibration[level] = t
        report["temperature"].append(t)
        report["loss_before"].append(loss(lg, tg, 1.0))
        report["loss_after"].append(loss(lg, tg, t))
        report["regions"].append(int(tg.shape[0] if objective == "top_word" else tg.any(-1).sum()))
        if objective == "top_word":  # in-sample: how well one temperature can do on these regions
            right = tg.cpu().numpy()
            for name, scale in (("before", 1.0), ("after", t)):
                top = top_probability(lg, scale).cpu().numpy()
                report.setdefault(f"ece_{name}", []).append(expected_calibration_error(top, right))
                report.setdefault(f"mean_top_probability_{name}", []).append(float(top.mean()))
            report.setdefault("agreement", []).append(float(right.mean()))
    return report


# --- the evaluation -------------------------------------------------------------------------------


def evaluate_explanations(
    model: torch.nn.Module,
    normal_hu: np.ndarray,
    low_hu: np.ndarray | None = None,
    denoised_hu: np.ndarray | None = None,
    lesion: np.ndarray | None = None,
    *,
    slices: int | None = None,
    batch_size: int = 4,
    device: str = "cpu",
    flags: bool = True,
    command: str | None = None,
) -> dict:
    """Score a LangMamba's (or LangAE's) explanations on one volume; arrays ``(Z, H, W)`` in HU (lesion bool).

    ``slices`` keeps that many slices, spread evenly (for quick runs); ``flags=False`` skips the explainer
    runs. Returns the JSON-serialisable dict described in the module docstring.
    """
    normal_hu = np.asarray(normal_hu, np.float32)
    if normal_hu.ndim != 3:
        raise InputError(f"normal_hu must be a volume (Z, H, W), got shape {normal_hu.shape}")
    others = {"low_hu": low_hu, "denoised_hu": denoised_hu, "lesion": lesion}
    for name, array in others.items():
        if array is not None and np.shape(array) != normal_hu.shape:
            raise InputError(f"{name} has shape {np.shape(array)}, normal_hu {normal_hu.shape}")
    keep = np.arange(normal_hu.shape[0])
    if slices is not None and slices < len(keep):
        keep = np.unique(np.linspace(0, len(keep) - 1, slices).round().astype(int))
    pick = lambda a: None if a is None else np.asarray(a)[keep]  # noqa: E731
    normal_hu, low_hu, denoised_hu, lesion = pick(normal_hu), pick(low_hu), pick(denoised_hu), pick(lesion)
    if lesion is not None:
        lesion = lesion != 0

    langae = _langae(model).to(device=device, dtype=torch.float32).eval()
    quantizer = langae.quantizer
    level = quantizer.num_levels - 1
    factor = langae.downsample_factor
    classes = word_classes(langae)
    word_class = class_ids(classes, device)
    lesion_word = torch.tensor([c == "lesion" for c in classes], device=device)

    tallies: dict[str, list] = {
        k: [] for k in ("agree", "stab_out", "stab_in", "tumour", "false_lesion", "rmse_q", "rmse_c", "rmse_low")
    }
    confidences, correct, dominant_all, coarse = [], [], [], []
    words = {"normal": [], "low": [], "denoised": []}
    body_regions, tumour_regions, grid = [], [], None
    for start in range(0, normal_hu.shape[0], batch_size):
        stop = min(start + batch_size, normal_hu.shape[0])
        hu = _pad(torch.as_tensor(normal_hu[start:stop], device=device), factor)
        latent = (hu.shape[-2] // factor, hu.shape[-1] // factor)
        grid = quantizer.level_grids(latent)[level]
        les = None if lesion is None else _pad(torch.as_tensor(lesion[start:stop], device=device).float(), factor)
        truth = region_truth(hu, les, factor, grid)
        read = read_regions(langae, hu, level)
        body = truth["body"]
        body_regions.append(body.cpu())
        agree = word_class[read["top_id"]] == truth["dominant"]
        words["normal"].append(read["top_id"].cpu())
        coarse.append(read["coarse_ids"].cpu())
        full_body = body_mask(hu)
        for b in range(stop - start):
            tallies["agree"].append((float(agree[b][body[b]].sum()), float(body[b].sum())))
            for key, path in (("rmse_q", "quantized"), ("rmse_c", "continuous")):
                if path in read:
                    error = (read[path][b] - hu[b]).pow(2)[full_body[b]]
                    tallies[key].append((float(error.sum()), float(error.numel())))
        confidences.append(read["top_prob"][body].cpu().numpy())
        correct.append(agree[body].cpu().numpy())
        dominant_all.append(truth["dominant"][body].cpu().numpy())
        if les is not None:
            is_lesion = lesion_word[read["top_id"]]
            tumour = truth["lesion_fraction"] >= LESION_MAJORITY
            clean = body & (truth["lesion_fraction"] == 0)
            tumour_regions.append(tumour.cpu())
            for b in range(stop - start):
                if tumour[b].any():
                    tallies["tumour"].append((float(is_lesion[b][tumour[b]].sum()), float(tumour[b].sum())))
                tallies["false_lesion"].append((float(is_lesion[b][clean[b]].sum()), float(clean[b].sum())))
        for name, array in (("low", low_hu), ("denoised", denoised_hu)):
            if array is not None:
                other = _pad(torch.as_tensor(array[start:stop], device=device), factor)
                words[name].append(read_regions(langae, other, level, reconstruct=False)["top_id"].cpu())
                if name == "low":
                    for b in range(stop - start):
                        e2 = (other[b] - hu[b]).pow(2)[full_body[b]]
                        tallies["rmse_low"].append((float(e2.sum()), float(e2.numel())))

    confidences, correct = np.concatenate(confidences), np.concatenate(correct)
    dominant_all = np.concatenate(dominant_all)
    counts = np.bincount(dominant_all, minlength=len(REGION_CLASSES)) if dominant_all.size else np.zeros(1)
    majority = int(counts.argmax())
    coarse_ids = torch.cat(coarse).reshape(-1)
    usage = torch.bincount(coarse_ids, minlength=quantizer.codebook_size).double()
    p = usage / usage.sum()
    body_all = torch.cat(body_regions)

    def rmse(key: str) -> dict:
        pairs = tallies[key]
        if not pairs:
            return {}
        value = math.sqrt(sum(p[0] for p in pairs) / max(sum(p[1] for p in pairs), 1))
        low_high = bootstrap_interval(pairs)
        return {"value": value, "ci95": [math.sqrt(v) for v in low_high]}

    result = {
        "slices": int(normal_hu.shape[0]),
        "level": level,
        "grid": [int(g) for g in grid],
        "region_px": factor * math.ceil(latent[0] / grid[0]),
        "language_space": {
            "backend": getattr(langae, "vlm_backend", None),
            "model": getattr(langae, "vlm_id", None),
            "quantizer": langae.get_config().get("quantizer", "average"),
            "vocabulary_size": quantizer.codebook_size,
        },
        "tissue_agreement": {
            **_ratio(tallies["agree"]),
            "majority_baseline": {
                "class": REGION_CLASSES[majority],
                "value": float(counts[majority] / max(counts.sum(), 1)),
            },
        },
        "calibration": {
            "ece": expected_calibration_error(confidences, correct),
            "mean_top_probability": float(confidences.mean()) if confidences.size else float("nan"),
            "uniform_probability": 1.0 / quantizer.codebook_size,
            "bins": ECE_BINS,
        },
        "reconstruction": {
            "rmse_body_hu_quantized": rmse("rmse_q"),
            "rmse_body_hu_continuous": rmse("rmse_c"),
            "rmse_body_hu_low_dose_input": rmse("rmse_low"),
        },
        "code_usage": {
            "coarse_distinct_words": int((usage > 0).sum()),
            "coarse_perplexity": float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum())),
        },
    }
    if lesion is not None:
        result["lesion_grounding"] = {
            "tumour_read_as_lesion": _ratio(tallies["tumour"]),
            "non_tumour_read_as_lesion": _ratio(tallies["false_lesion"]),
            "baseline_never_lesion": {"tumour_read_as_lesion": 0.0, "non_tumour_read_as_lesion": 0.0},
        }
    if low_hu is not None and denoised_hu is not None:
        reference = torch.cat(words["normal"])
        stab = {}
        for name in ("denoised", "low"):
            same = torch.cat(words[name]) == reference
            stab[name] = [(float(same[i][body_all[i]].sum()), float(body_all[i].sum())) for i in range(len(same))]
        result["stability"] = {
            "denoised_vs_normal": _ratio(stab["denoised"]),
            "low_vs_normal": _ratio(stab["low"]),
            "gain": _difference(stab["denoised"], stab["low"]),
        }
        if flags:
            honest = explainer_flags(model, low_hu, denoised_hu, level, grid, device)
            body_np = body_all.numpy()
            result["change_flags"] = {
                "rule": "langmamba.explain.explain_volume 'changed' (low-dose input against output)",
                "honest_flag_rate": _ratio(
                    [(float(honest[i][body_np[i]].sum()), float(body_np[i].sum())) for i in range(len(honest))]
                ),
            }
            if lesion is not None and lesion.any():
                erased = explainer_flags(model, low_hu, erase_lesion(denoised_hu, lesion), level, grid, device)
                tumour_np = torch.cat(tumour_regions).numpy()
                pairs = [
                    (float(erased[i][tumour_np[i]].sum()), float(tumour_np[i].sum()))
                    for i in range(len(erased))
                    if tumour_np[i].any()
                ]
                result["change_flags"]["erased_tumour_sensitivity"] = _ratio(pairs)
                result["change_flags"]["erased_tumour_flag_rate_outside_tumour"] = _ratio(
                    [
                        (float(erased[i][body_np[i] & ~tumour_np[i]].sum()), float((body_np[i] & ~tumour_np[i]).sum()))
                        for i in range(len(erased))
                    ]
                )
    if command:
        result["command"] = command
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m langmamba.evaluate_explanations CASE.npz --model DIR``: arrays ``normal`` (required),
    ``low``, ``denoised``, ``label`` (Z, H, W) in the .npz; prints and optionally writes the JSON. With
    ``--calibrate OUT``: fits the word calibration on validation slices and saves the model to OUT."""
    from langmamba.checkpoint import load_checkpoint

    parser = argparse.ArgumentParser(prog="python -m langmamba.evaluate_explanations", description=main.__doc__)
    parser.add_argument("case", help=".npz with normal, low, denoised, label arrays (Z, H, W)")
    parser.add_argument("--model", required=True, help="LangMamba or LangAE checkpoint folder")
    parser.add_argument("--slices", type=int, help="evaluate this many slices, spread evenly")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--no-flags", action="store_true", help="skip the explainer's change flags")
    parser.add_argument("--output", help="write the JSON here")
    parser.add_argument(
        "--calibrate",
        metavar="OUT",
        help="instead of evaluating: fit the word calibration on CASE (validation slices, never "
        "lung2: a case .npz or a prepared training set with --patients) and save the "
        "calibrated model to the new checkpoint folder OUT",
    )
    parser.add_argument("--patients", nargs="*", help="with --calibrate on a prepared set: the patients to use")
    parser.add_argument(
        "--objective",
        choices=CALIBRATION_OBJECTIVES,
        default="top_word",
        help="with --calibrate: what the temperature fits (see fit_calibration)",
    )
    args = parser.parse_args(argv)
    device = str(resolve_device(args.device))
    if args.calibrate:
        from langmamba.checkpoint import save_checkpoint

        model = load_checkpoint(args.model)
        with np.load(args.case) as case:
            prepared = "normal" not in case
            if not prepared:
                normal, label = case["normal"], case.get("label", None)
        if prepared:
            from langmamba.data.prepared import load_prepared

            chosen = [s for s in load_prepared(args.case)[0] if not args.patients or s.patient in args.patients]
            if not chosen:
                raise InputError(f"{args.case} has no slices of the patients {args.patients}")
            normal, label = [s.full for s in chosen], [s.label for s in chosen]
        stored_dtype = next(model.parameters()).dtype
        report = fit_calibration(model, normal, label, objective=args.objective, device=device)
        model.to(stored_dtype)  # saved as it was stored (the shipped weights are half precision)
        report["fitted_on"] = f"{Path(args.case).name}" + (
            f" patients {', '.join(args.patients)}" if args.patients else ""
        )
        extra = dict(model.checkpoint_config.get("extra", {}), word_calibration=report)
        save_checkpoint(model, args.calibrate, extra=extra)
        print(json.dumps(report, indent=1))
        return 0
    with np.load(args.case) as case:
        arrays = {k: case.get(k, None) for k in ("normal", "low", "denoised", "label")}
    if arrays["normal"] is None:
        raise InputError(f"{args.case} has no 'normal' array")
    result = evaluate_explanations(
        load_checkpoint(args.model),
        arrays["normal"],
        arrays["low"],
        arrays["denoised"],
        arrays["label"],
        slices=args.slices,
        device=device,
        flags=not args.no_flags,
        command="python -m langmamba.evaluate_explanations " + " ".join(argv or []),
    )
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        write_text(args.output, text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
