"""SPAE-style pyramid quantizer onto a frozen language codebook (Yu et al. 2023, "SPAE").

Every latent vector of the LangAE is explained by words: the codebook is a frozen ``(V, E)`` tensor of
word embeddings from the language space (``langmamba.vlm``), registered as a buffer and never trained.
The quantizer reads a latent map at three region grids, coarse to fine, and picks one word per region.

Definitions, for a continuous latent ``z`` of shape ``(B, E, h, w)`` and levels ``l = 1..L`` (L = 3,
grids ``(2, 2)``, ``(8, 8)`` and the full ``(h, w)``):

- *Cells.* Along an axis of length ``n`` split into ``g`` cells, position ``i`` belongs to cell
  ``floor(i * g / n)``: contiguous cells whose sizes differ by at most one (a 24-row latent on the
  8-grid gives 3 rows per cell; a 28-column one on the 8-grid gives cells of 3 or 4 columns).
  ``pool`` is the mean over a cell; ``up`` copies a cell's vector back to each of its positions.
- *Streaming average.* ``e_l`` is the codebook row picked at level ``l`` (one per cell) and the running
  reconstruction after level ``l`` is the average of the levels covering each position,
  ``ẑ_l = (1 / l) * Σ_{i<=l} up(e_i)``. The quantized output is ``ẑ_L``.
- *Residual target.* Level ``l`` looks up the vector that would make the running average equal ``z``:
  ``t_l = l * z - Σ_{i<l} up(e_i) = z + (l - 1) * (z - ẑ_{l-1})``, i.e. ``z`` plus the residual the
  previous levels left, weighted by how many levels it is averaged with. Its region latent is
  ``r_l = pool(t_l)`` at the level's grid, and ``e_l = codebook[argmin_v ||codebook[v] - r_l||²]``.
  Level 1 therefore quantizes the mean latent of each 2×2 cell, and every ``r_l`` stays on the scale of
  ``z`` so each level's token is itself a meaningful word (SPAE's reason for averaging instead of
  summing residual codes).
- *Straight-through.* ``quantized = z + sg(ẑ_L - z)``: the forward value is ``ẑ_L``, gradients reach
  ``z`` unchanged (``sg`` = stop-gradient). The codebook is a buffer and gets no gradient.
- *Commitment loss.* ``beta * mean_l( mean((r_l - sg(e_l))²) / l² )``. Divided by ``l²`` each term is
  the squared error of the running reconstruction after level ``l``, measured at that level's grid
  (``(r_l - e_l) / l = pool(z) - pool(ẑ_l)``), so the levels are weighted alike.
- *Semantic loss.* For an image with candidate words ``C`` at level ``l``, and each region latent ``r``,
  ``-log( exp(-||e_c - r||²) / Σ_v exp(-||e_v - r||²) )`` averaged over ``c`` in ``C`` and over the
  level's regions; the result is averaged over all (image, level) pairs that have candidates and is 0
  when none has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from langmamba.errors import InputError

CandidateSpec = torch.Tensor | Sequence[torch.Tensor]
"""Candidate words of one level: a ``(B, V)`` boolean mask, or a length-B list of LongTensors of ids."""


@dataclass
class QuantizerOutput:
    """What :class:`PyramidLanguageQuantizer` returns (``B`` batch, ``E`` codebook dim, ``h × w`` latent).

    - ``quantized``: ``(B, E, h, w)`` streaming average ``ẑ_L`` with straight-through gradients.
    - ``continuous``: ``(B, E, h, w)`` the input latent ``z``.
    - ``token_ids``: per level, ``(B, g_h, g_w)`` LongTensor of codebook rows (vocabulary indices).
    - ``region_latents``: per level, ``(B, g_h, g_w, E)`` the vector the level looked up (``r_l``);
      :func:`word_scores` turns them into top-k words.
    - ``grids``: per level, ``(g_h, g_w)``.
    - ``commitment_loss``: scalar, already multiplied by ``beta``.
    - ``semantic_loss``: scalar, 0 when no candidate words were given.
    - ``word_logits``: per level ``(B, g_h, g_w, V)`` detached word-reading logits (residual quantizer only).
    - ``detail_ids``: per detail stage ``(B, h, w, G)`` token ids (residual quantizer only).
    """

    quantized: torch.Tensor
    continuous: torch.Tensor
    token_ids: list[torch.Tensor]
    region_latents: list[torch.Tensor]
    grids: list[tuple[int, int]]
    commitment_loss: torch.Tensor
    semantic_loss: torch.Tensor
    word_logits: list[torch.Tensor] | None = None
    detail_ids: list[torch.Tensor] | None = None


def cell_index(size: int, cells: int, device: torch.device | None = None) -> torch.Tensor:
    """``(size,)`` LongTensor: the cell (0..cells-1) each of ``size`` positions falls in."""
    return torch.div(torch.arange(size, device=device) * cells, size, rounding_mode="floor")


def _averaging_matrix(size: int, cells: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``(cells, size)``: row ``p`` averages the positions of cell ``p``."""
    one_hot = F.one_hot(cell_index(size, cells, device), cells).T.to(dtype)
    return one_hot / one_hot.sum(dim=1, keepdim=True)


def pool_to_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Cell means: ``(B, E, h, w) -> (B, E, g_h, g_w)`` (identity when the grid is the full size)."""
    h, w = x.shape[-2:]
    if (h, w) == tuple(grid):
        return x
    mh = _averaging_matrix(h, grid[0], x.device, x.dtype)
    mw = _averaging_matrix(w, grid[1], x.device, x.dtype)
    return torch.einsum("ph,behw,qw->bepq", mh, x, mw)


def expand_from_grid(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Copy each cell's vector to its positions: ``(B, E, g_h, g_w) -> (B, E, h, w)``."""
    gh, gw = x.shape[-2:]
    if (gh, gw) == tuple(size):
        return x
    x = x.index_select(-2, cell_index(size[0], gh, x.device))
    return x.index_select(-1, cell_index(size[1], gw, x.device))


def squared_distances(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``||v - c||²`` for ``vectors (N, E)`` and ``codebook (V, E)`` -> ``(N, V)``, in float32."""
    vectors = vectors.float()
    codebook = codebook.float()
    dist = (
        vectors.pow(2).sum(dim=1, keepdim=True) - 2.0 * vectors @ codebook.T + codebook.pow(2).sum(dim=1).unsqueeze(0)
    )
    return dist.clamp_min(0.0)


def word_scores(region_latents: torch.Tensor, codebook: torch.Tensor, k: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k words of region latents ``(..., E)``: ``(ids (..., k) long, probabilities (..., k))``.

    Probabilities are the softmax over the whole vocabulary of negative squared codebook distances
    (the same scores the semantic loss trains), so they need not sum to 1 over the top k.
    """
    if region_latents.shape[-1] != codebook.shape[1]:
        raise InputError(
            f"region latents have dimension {region_latents.shape[-1]} but the codebook rows have {codebook.shape[1]}"
        )
    k = min(k, codebook.shape[0])
    lead = region_latents.shape[:-1]
    probs = torch.softmax(-squared_distances(region_latents.reshape(-1, codebook.shape[1]), codebook), dim=-1)
    top_probs, top_ids = probs.topk(k, dim=-1)
    return top_ids.reshape(*lead, k), top_probs.reshape(*lead, k)


class PyramidLanguageQuantizer(nn.Module):
    """Quantize ``(B, E, h, w)`` latents onto a frozen word codebook at a pyramid of region grids.

    See the module docstring for the exact definitions. ``grids`` are the coarse levels; the full
    latent resolution is always the last level. Any ``h, w >= 1`` works: coarse grids larger than the
    latent are clamped to it (see :meth:`level_grids`).

    Args:
        codebook: ``(V, E)`` word embeddings, copied into a frozen buffer. If ``None``, a zero buffer of
            ``(codebook_size, codebook_dim)`` is made, to be filled by ``load_state_dict``.
        codebook_size: V, needed only without ``codebook``.
        codebook_dim: E, needed only without ``codebook``.
        grids: region grids ``(g_h, g_w)`` of the levels before the full-resolution one.
        beta: commitment-loss weight.
    """

    codebook: torch.Tensor

    def __init__(
        self,
        codebook: torch.Tensor | None = None,
        *,
        codebook_size: int | None = None,
        codebook_dim: int | None = None,
        grids: Sequence[Sequence[int]] = ((2, 2), (8, 8)),
        beta: float = 0.25,
    ) -> None:
        super().__init__()
        if codebook is None:
            if codebook_size is None or codebook_dim is None:
                raise InputError("PyramidLanguageQuantizer needs a codebook tensor or codebook_size and codebook_dim")
            codebook = torch.zeros(int(codebook_size), int(codebook_dim))
        else:
            codebook = torch.as_tensor(codebook).detach().clone()
            if codebook.ndim != 2 or codebook.shape[0] < 1 or codebook.shape[1] < 1:
                raise InputError(f"the codebook must be a (V, E) matrix, got shape {tuple(codebook.shape)}")
            if not codebook.is_floating_point():
                codebook = codebook.float()
            if not torch.isfinite(codebook).all():
                raise InputError("the codebook contains NaN or infinite values")
            for name, given, actual in (
                ("codebook_size", codebook_size, codebook.shape[0]),
                ("codebook_dim", codebook_dim, codebook.shape[1]),
            ):
                if given is not None and int(given) != actual:
                    raise InputError(
                        f"{name}={given} does not match the codebook tensor's shape {tuple(codebook.shape)}"
                    )
        self.register_buffer("codebook", codebook.requires_grad_(False))
        self.grids: tuple[tuple[int, int], ...] = tuple((int(g[0]), int(g[1])) for g in grids)
        if any(g < 1 for grid in self.grids for g in grid):
            raise InputError(f"region grids must be positive, got {self.grids}")
        self.beta = float(beta)

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    @property
    def codebook_dim(self) -> int:
        return self.codebook.shape[1]

    def mean_row_norm(self) -> torch.Tensor:
        """Mean Euclidean norm of the codebook rows (scalar; 1 for unit-norm sentence embeddings)."""
        norm: torch.Tensor = self.codebook.float().norm(dim=1).mean()
        return norm

    @property
    def num_levels(self) -> int:
        return len(self.grids) + 1

    def level_grids(self, latent_size: tuple[int, int]) -> list[tuple[int, int]]:
        """The ``(g_h, g_w)`` of every level for a latent of ``latent_size = (h, w)``.

        A coarse grid finer than the latent is clamped to it (``(8, 8)`` becomes ``(4, 4)`` for a
        4×4 latent, e.g. a 64² training patch), so small inputs work with repeated full-size levels.
        """
        h, w = int(latent_size[0]), int(latent_size[1])
        return [*((min(gh, h), min(gw, w)) for gh, gw in self.grids), (h, w)]

    def word_probabilities(self, region_latents: torch.Tensor, level: int) -> torch.Tensor:
        """Probabilities ``(..., V)`` of region latents ``(..., E)``: softmax of negative squared distances
        (this quantizer's scores, the same at every level; the residual quantizer calibrates them)."""
        if region_latents.shape[-1] != self.codebook_dim:
            raise InputError(
                f"region latents have dimension {region_latents.shape[-1]} but the codebook rows have "
                f"{self.codebook_dim}"
            )
        lead = region_latents.shape[:-1]
        dist = squared_distances(region_latents.reshape(-1, self.codebook_dim), self.codebook)
        return torch.softmax(-dist, dim=-1).reshape(*lead, self.codebook_size)

    def candidate_mask(self, candidates: CandidateSpec | None, batch: int) -> torch.Tensor | None:
        """One level's candidates as a ``(B, V)`` float mask (``None`` when there are none)."""
        if candidates is None:
            return None
        vocab = self.codebook_size
        device = self.codebook.device
        if isinstance(candidates, torch.Tensor):
            if candidates.shape != (batch, vocab):
                raise InputError(
                    f"a candidate mask must have shape (batch, vocabulary) = ({batch}, {vocab}), "
                    f"got {tuple(candidates.shape)}"
                )
            mask = candidates.to(device=device, dtype=torch.bool)
        else:
            if len(candidates) != batch:
                raise InputError(f"got candidate id lists for {len(candidates)} images but the batch has {batch}")
            mask = torch.zeros(batch, vocab, dtype=torch.bool, device=device)
            for b, ids in enumerate(candidates):
                ids = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
                if ids.numel() and (ids.min() < 0 or ids.max() >= vocab):
                    raise InputError(f"candidate word ids of image {b} fall outside the vocabulary 0..{vocab - 1}")
                mask[b, ids] = True
        return mask.float() if mask.any() else None

    def forward(self, z: torch.Tensor, candidates: Sequence[CandidateSpec | None] | None = None) -> QuantizerOutput:
        """Quantize ``z (B, E, h, w)``; ``candidates`` holds one :data:`CandidateSpec` (or None) per level."""
        if z.ndim != 4 or z.shape[1] != self.codebook_dim:
            raise InputError(
                f"the quantizer expects latents (B, {self.codebook_dim}, h, w), got shape {tuple(z.shape)}"
            )
        batch, dim, h, w = z.shape
        grids = self.level_grids((h, w))
        if candidates is not None and len(candidates) != len(grids):
            raise InputError(f"candidates must list one entry per level ({len(grids)}), got {len(candidates)}")

        codebook = self.codebook
        recon_sum = torch.zeros_like(z, dtype=torch.float32).detach()
        token_ids: list[torch.Tensor] = []
        region_latents: list[torch.Tensor] = []
        commitment = z.new_zeros((), dtype=torch.float32)
        semantic_sum = z.new_zeros((), dtype=torch.float32)
        semantic_count = 0
        for level, grid in enumerate(grids, start=1):
            target = level * z.float() - recon_sum
            region = pool_to_grid(target, grid).permute(0, 2, 3, 1)  # (B, g_h, g_w, E)
            flat = region.reshape(-1, dim)
            mask = None if candidates is None else self.candidate_mask(candidates[level - 1], batch)
            if mask is None:
                with torch.no_grad():
                    ids = squared_distances(flat, codebook).argmin(dim=1)
            else:
                dist = squared_distances(flat, codebook)
                ids = dist.detach().argmin(dim=1)
                log_prob = torch.log_softmax(-dist, dim=1).reshape(batch, -1, self.codebook_size)
                counts = mask.sum(dim=1)
                # Mean over candidates of -log p(c | r), then over the regions of each image.
                per_image = -(torch.bmm(log_prob, mask.unsqueeze(-1)).squeeze(-1)).mean(dim=1) / counts.clamp_min(1)
                has = counts > 0
                semantic_sum = semantic_sum + per_image[has].sum()
                semantic_count += int(has.sum())
            words = codebook[ids].float().reshape(region.shape)
            commitment = commitment + F.mse_loss(region, words.detach()) / level**2
            token_ids.append(ids.reshape(batch, *grid))
            region_latents.append(region)
            recon_sum = recon_sum + expand_from_grid(words.permute(0, 3, 1, 2), (h, w))

        averaged = (recon_sum / len(grids)).to(z.dtype)
        quantized = z + (averaged - z).detach()
        semantic = semantic_sum / semantic_count if semantic_count else semantic_sum
        return QuantizerOutput(
            quantized=quantized,
            continuous=z,
            token_ids=token_ids,
            region_latents=region_latents,
            grids=grids,
            commitment_loss=self.beta * commitment / len(grids),
            semantic_loss=semantic,
        )
