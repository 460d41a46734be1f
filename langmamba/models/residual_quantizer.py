"""Residual quantizer onto frozen language codes whose levels add up (SPAE-style pyramid, residual).

For a continuous latent ``z`` ``(B, E, h, w)`` (``E`` = the language space's embedding width):

- *Word levels* ``l = 1..L`` (coarse to fine). Level ``l`` splits the latent into regions of about
  ``s_l × s_l`` latent cells (``region_sizes``; grid ``g = ceil(h / s_l)``, cells as in
  :func:`langmamba.models.quantizer.pool_to_grid`). With the residual ``ρ_1 = z`` it picks for each region
  the word ``v`` of the frozen region vocabulary ``C`` ``(V, E)`` nearest to the region mean of the
  residual, ``argmin_v ||pool(ρ_l) - a_l C_v||²``, and subtracts it: ``ρ_{l+1} = ρ_l - up(a_l C_v)``.
- *Detail stages* ``k = 1..K`` at the full latent resolution code what the words left with rows of the
  language model's token table, read in ``d`` whitened principal dimensions
  (:mod:`langmamba.vlm.token_codes`): ``D`` ``(N, d)``, projection ``P`` ``(G·d, E)`` with orthonormal rows,
  split into ``G`` groups ``P_g`` of ``d`` rows. Stage ``k`` picks ``argmin_n ||P_g ρ - b_k D_n||²`` per latent
  cell and group and subtracts ``Σ_g P_g^T b_k D_{n_g}`` (``G`` tokens per cell and stage).
- *Sum.* ``ẑ = Σ_l up(a_l C_{v_l}) + Σ_k P^T b_k D_{n_k} = z - ρ_final``; the decoder sees
  ``quantized = z + sg(ẑ - z)`` (straight-through). Nothing is averaged, so no level is shrunk.
- *Codable latent* (``project_latent``). The detail stages can only code the residual's part inside the
  detail span ``P``; what lies outside it after the word levels never reaches the decoder, yet the
  straight-through gradient lets the encoder put energy there (about a quarter of it in the first residual
  LangAE). With ``project_latent`` the latent is first reduced to what can be coded,
  ``z' = W + P^T P (z - W)`` with ``W = Σ_l up(a_l C_{v_l})`` (held constant), and ``z'`` replaces ``z``
  above (``continuous`` returns it): the encoder's gradient reaches only the coded span.
- *Gains* ``a_l, b_k`` are scalars per level (codebook rows have a fixed norm while residuals shrink).
  They are buffers, not parameters: in training each forward sets them towards the least-squares scale
  of the codes it picked, ``Σ <ρ, c> / Σ ||c||²``, by an exponential moving average (``gain_momentum``);
  the first training forward starts from the ratio of RMS values and takes the least-squares value directly.
- *Commitment loss* ``beta * mean((z - sg(ẑ))²)``.
- *Word reading.* What a region *is* is read from the region's own latent, not from its residual: the
  region mean ``r_l = pool(z)`` (``region_latents``) scores every word by
  ``logit_v = t_l * cos(r_l, C_v)``, ``t_l = exp(log_logit_scale_l) * calibration_l``;
  :meth:`word_probabilities` is the softmax over the vocabulary. ``log_logit_scale`` is learned with the
  semantic loss; ``calibration`` (1 by default) is a temperature fitted afterwards on validation regions
  (:func:`langmamba.evaluate_explanations.fit_temperature`). Level 1's word is the top word of its reading.
- *Semantic loss.* Where a region has candidate words ``S`` (a ``(B, g_h, g_w, V)`` mask per level, or a
  ``(B, V)`` mask per image applied to all its regions), ``-(log Σ_{v∈S} p_v + log max_{v∈S} p_v) / 2``: any
  candidate may take the mass (the first term), and the second gathers it on one of them rather than
  spreading it over synonyms, so the top word's probability is the class's. Averaged over the regions that
  have candidates, then over levels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from langmamba.errors import InputError
from langmamba.models.quantizer import CandidateSpec, QuantizerOutput, expand_from_grid, pool_to_grid

_CHUNK = 8192


def _frozen_buffer(value: torch.Tensor | None, shape: tuple[int, int] | None, name: str) -> torch.Tensor:
    if value is None:
        if shape is None or min(shape) < 1:
            raise InputError(f"the residual quantizer needs the {name} tensor or its size")
        return torch.zeros(shape)
    value = torch.as_tensor(value).detach().clone().float()
    if value.ndim != 2 or min(value.shape) < 1:
        raise InputError(f"the {name} must be a 2-D matrix, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise InputError(f"the {name} contains NaN or infinite values")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise InputError(f"the {name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    return value


def _nearest(vectors: torch.Tensor, codes: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
    """``argmin_n ||x - gain * codes[n]||²`` for ``vectors (M, d)``, ``codes (N, d)`` -> long ``(M,)``, chunked."""
    # score = 2 x·c - gain ||c||² in one GEMM with the penalty as its bias: no separate pass over the (M, N) scores.
    negative_penalty = -gain * codes.pow(2).sum(dim=1)
    codes_t = codes.T
    out = []
    for start in range(0, vectors.shape[0], _CHUNK):
        score = torch.addmm(negative_penalty, vectors[start : start + _CHUNK], codes_t, alpha=2.0)
        out.append(score.argmax(dim=1))
    return torch.cat(out) if out else vectors.new_zeros(0, dtype=torch.long)


class ResidualLanguageQuantizer(nn.Module):
    """Word levels plus detail stages that add up to the quantized latent (see the module docstring).

    Args:
        codebook: ``(V, E)`` region-vocabulary embeddings (frozen); or ``codebook_size``/``codebook_dim``.
        detail_codebook: ``(N, d)`` whitened token codes; or ``detail_codebook_size``/``detail_dim``.
        detail_projection: ``(G * d, E)`` orthonormal rows; built empty from the sizes when not given.
        detail_groups: G, coordinate groups of ``d`` quantized separately per latent cell.
        region_sizes: latent cells per region side of each word level, coarse to fine.
        detail_stages: K, residual detail codes per latent cell.
        beta: commitment-loss weight.
        project_latent: reduce the latent to the coded span before the detail stages (module docstring).
        logit_scale: initial word-reading temperature ``t`` (learned).
        gain_momentum: EMA momentum of the gains.
    """

    codebook: torch.Tensor
    detail_codebook: torch.Tensor
    detail_projection: torch.Tensor
    calibration: torch.Tensor
    word_gains: torch.Tensor
    detail_gains: torch.Tensor
    gains_set: torch.Tensor

    calibrated = True
    """:meth:`word_probabilities` applies a learned (or validation-fitted) temperature per level."""

    def __init__(
        self,
        codebook: torch.Tensor | None = None,
        *,
        codebook_size: int | None = None,
        codebook_dim: int | None = None,
        detail_codebook: torch.Tensor | None = None,
        detail_projection: torch.Tensor | None = None,
        detail_codebook_size: int | None = None,
        detail_dim: int | None = None,
        region_sizes: Sequence[int] = (8, 4, 2),
        detail_stages: int = 8,
        detail_groups: int = 1,
        beta: float = 0.25,
        project_latent: bool = False,
        logit_scale: float = 10.0,
        gain_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        words = _frozen_buffer(
            codebook, None if codebook is not None else (int(codebook_size or 0), int(codebook_dim or 0)), "codebook"
        )
        self.register_buffer("codebook", words)
        dim = words.shape[1]
        details = _frozen_buffer(
            detail_codebook,
            None if detail_codebook is not None else (int(detail_codebook_size or 0), int(detail_dim or 0)),
            "detail codebook",
        )
        self.register_buffer("detail_codebook", details)
        if detail_groups < 1:
            raise InputError(f"detail_groups must be at least 1, got {detail_groups}")
        self.detail_groups = int(detail_groups)
        projection = _frozen_buffer(
            detail_projection, (details.shape[1] * self.detail_groups, dim), "detail projection"
        )
        self.register_buffer("detail_projection", projection)
        self.region_sizes = tuple(int(s) for s in region_sizes)
        if not self.region_sizes or min(self.region_sizes) < 1:
            raise InputError(f"region_sizes must list positive sizes, got {region_sizes}")
        if detail_stages < 0:
            raise InputError(f"detail_stages must be 0 or more, got {detail_stages}")
        self.detail_stages = int(detail_stages)
        self.beta = float(beta)
        self.project_latent = bool(project_latent)
        self.gain_momentum = float(gain_momentum)
        levels = len(self.region_sizes)
        self.log_logit_scale = nn.Parameter(torch.full((levels,), math.log(float(logit_scale))))
        self.register_buffer("calibration", torch.ones(levels))
        self.register_buffer("word_gains", torch.ones(levels))
        self.register_buffer("detail_gains", torch.ones(self.detail_stages))
        self.register_buffer("gains_set", torch.zeros(()))

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def codebook_dim(self) -> int:
        return self.codebook.shape[1]

    def mean_row_norm(self) -> torch.Tensor:
        """Mean Euclidean norm of the codebook rows (scalar), as :class:`PyramidLanguageQuantizer`'s."""
        norm: torch.Tensor = self.codebook.float().norm(dim=1).mean()
        return norm

    @property
    def num_levels(self) -> int:
        return len(self.region_sizes)

    def level_grids(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        """``(g_h, g_w) = (ceil(h / s), ceil(w / s))`` of every word level for a latent ``(h, w)``."""
        h, w = int(latent_size[0]), int(latent_size[1])
        return [(math.ceil(h / s), math.ceil(w / s)) for s in self.region_sizes]

    def logit_scales(self) -> torch.Tensor:
        """Word-reading temperature ``t_l`` per level ``(L,)``: learned scale times the fitted calibration."""
        return self.log_logit_scale.exp() * self.calibration

    def word_logits(self, region_latents: torch.Tensor, level: int) -> torch.Tensor:
        """Logits ``(..., V)`` of region latents ``(..., E)`` at a word level (float32)."""
        if region_latents.shape[-1] != self.codebook_dim:
            raise InputError(
                f"region latents have dimension {region_latents.shape[-1]} but the codebook rows have "
                f"{self.codebook_dim}"
            )
        cosine = F.normalize(region_latents.float(), dim=-1) @ F.normalize(self.codebook.float(), dim=-1).T
        return cosine * self.logit_scales()[level]

    def word_probabilities(self, region_latents: torch.Tensor, level: int) -> torch.Tensor:
        """Calibrated probabilities ``(..., V)`` (sum 1 over the vocabulary) of region latents ``(..., E)``."""
        return torch.softmax(self.word_logits(region_latents, level), dim=-1)

    def _candidates(self, spec: CandidateSpec | None, batch: int, grid: tuple[int, int]) -> torch.Tensor | None:
        if spec is None:
            return None
        vocab = self.codebook_size
        if isinstance(spec, torch.Tensor):
            mask = spec.to(self.codebook.device).bool()
            if mask.shape == (batch, vocab):
                mask = mask[:, None, None, :].expand(batch, *grid, vocab)
            elif mask.shape != (batch, *grid, vocab):
                raise InputError(
                    f"candidates must be (batch, vocabulary) or (batch, g_h, g_w, vocabulary) = "
                    f"({batch}, {grid[0]}, {grid[1]}, {vocab}), got {tuple(mask.shape)}"
                )
        else:
            if len(spec) != batch:
                raise InputError(f"got candidate id lists for {len(spec)} images but the batch has {batch}")
            mask = torch.zeros(batch, vocab, dtype=torch.bool, device=self.codebook.device)
            for b, ids in enumerate(spec):
                ids = torch.as_tensor(ids, dtype=torch.long, device=mask.device).reshape(-1)
                if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
                    raise InputError(f"candidate word ids of image {b} fall outside the vocabulary 0..{vocab - 1}")
                mask[b, ids] = True
            mask = mask[:, None, None, :].expand(batch, *grid, vocab)
        return mask if mask.any() else None

    @torch.no_grad()
    def _initial_gain(self, gains: torch.Tensor, index: int, residual: torch.Tensor, codes: torch.Tensor) -> None:
        """Before the first update, match the codes' RMS to the residual's so the first picks are meaningful."""
        if not bool(self.gains_set):
            gains[index] = (residual.pow(2).mean().sqrt() / codes.pow(2).mean().sqrt().clamp_min(1e-12)).clamp_min(1e-4)

    @torch.no_grad()
    def _update_gain(self, gains: torch.Tensor, index: int, residual: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA of the least-squares gain of unit-gain ``codes`` against ``residual`` (both ``(M, d)``)."""
        best = ((residual * codes).sum() / codes.pow(2).sum().clamp_min(1e-12)).clamp_min(1e-4)
        momentum = self.gain_momentum if bool(self.gains_set) else 0.0
        gains[index] = momentum * gains[index] + (1.0 - momentum) * best

    def forward(
        self, z: torch.Tensor, candidates: Sequence[CandidateSpec | None] | None = None, details: bool = True
    ) -> QuantizerOutput:
        """Quantize ``z (B, E, h, w)``; ``candidates`` holds one candidate mask (or None) per word level.

        ``details=False`` stops after the word levels (all an explanation reads; ``quantized`` then holds
        only the words' sum, and no gains are updated)."""
        if z.ndim != 4 or z.shape[1] != self.codebook_dim:
            raise InputError(
                f"the quantizer expects latents (B, {self.codebook_dim}, h, w), got shape {tuple(z.shape)}"
            )
        batch, dim, h, w = z.shape
        grids = self.level_grids((h, w))
        if candidates is not None and len(candidates) != len(grids):
            raise InputError(f"candidates must list one entry per level ({len(grids)}), got {len(candidates)}")
        update = self.training and torch.is_grad_enabled() and details
        with torch.autocast(z.device.type, enabled=False):
            zf = z.float()
            residual = zf.detach().clone()
            words = self.codebook.float()
            token_ids, region_latents, logits_out = [], [], []
            semantic, semantic_levels = zf.new_zeros(()), 0
            for level, grid in enumerate(grids):
                region = pool_to_grid(zf, grid).permute(0, 2, 3, 1)  # (B, g_h, g_w, E), the reading
                logits = self.word_logits(region, level)
                mask = None if candidates is None else self._candidates(candidates[level], batch, grid)
                if mask is not None:
                    has = mask.any(dim=-1)
                    log_p = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
                    masked = log_p.masked_fill(~mask, float("-inf"))
                    # Half marginal (any candidate may take the mass), half the best candidate alone (so the
                    # mass gathers on one word instead of spreading over synonyms).
                    loss = -0.5 * (torch.logsumexp(masked, dim=-1) + masked.max(dim=-1).values)
                    semantic = semantic + loss[has].mean()
                    semantic_levels += 1
                target = pool_to_grid(residual, grid).permute(0, 2, 3, 1).reshape(-1, dim)
                if update:
                    self._initial_gain(self.word_gains, level, target, words)
                gain = self.word_gains[level]
                ids = _nearest(target, words, gain)
                if update:
                    self._update_gain(self.word_gains, level, target, words[ids])
                    gain = self.word_gains[level]
                code = (gain * words[ids]).reshape(batch, *grid, dim).permute(0, 3, 1, 2)
                residual = residual - expand_from_grid(code, (h, w))
                token_ids.append(ids.reshape(batch, *grid))
                region_latents.append(region)
                logits_out.append(logits.detach())
            projection = self.detail_projection.float()
            if self.project_latent:
                # Drop the part of the word residual outside the detail span, keeping the gradient on the rest.
                offset = zf - (zf.detach() - residual)  # z - W, with the gradient of z; W held constant
                inside = torch.einsum("de,bdhw->behw", projection, torch.einsum("de,behw->bdhw", projection, offset))
                outside = offset - inside
                zf = zf - outside
                residual = residual - outside.detach()
            detail_ids = []
            if self.detail_stages and details:
                codes = self.detail_codebook.float()
                for stage in range(self.detail_stages):
                    coords = torch.einsum("de,behw->bhwd", projection, residual).reshape(-1, codes.shape[1])
                    if update:
                        self._initial_gain(self.detail_gains, stage, coords, codes)
                    gain = self.detail_gains[stage]
                    ids = _nearest(coords, codes, gain)
                    if update:
                        self._update_gain(self.detail_gains, stage, coords, codes[ids])
                        gain = self.detail_gains[stage]
                    code = (gain * codes[ids]).reshape(batch, h, w, -1)
                    residual = residual - torch.einsum("de,bhwd->behw", projection, code)
                    detail_ids.append(ids.reshape(batch, h, w, self.detail_groups))
            if update:
                self.gains_set.fill_(1.0)
            reconstruction = zf.detach() - residual
            commitment = self.beta * F.mse_loss(zf, reconstruction)
        latent = zf.to(z.dtype) if self.project_latent else z
        quantized = latent + (reconstruction.to(z.dtype) - latent).detach()
        return QuantizerOutput(
            quantized=quantized,
            continuous=latent,
            token_ids=token_ids,
            region_latents=region_latents,
            grids=grids,
            commitment_loss=commitment,
            semantic_loss=semantic / semantic_levels if semantic_levels else semantic,
            word_logits=logits_out,
            detail_ids=detail_ids,
        )
