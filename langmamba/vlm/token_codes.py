"""Detail codes from a language model's frozen token-embedding table, for the residual quantizer.

The region vocabulary (about a hundred words) says what a region is but carries far too few bits to
rebuild the image. The LangAE's finest residual codes therefore come from the language model's whole
token table (all-MiniLM-L6-v2: 30,522 word pieces × 384; CLIP: its BPE token embeddings), read through
a fixed linear map. The codes are each token's coordinates along the table's top ``d`` principal
directions, divided by each direction's standard deviation (whitened), so the ``N × d`` codes spread
evenly over ``d`` dimensions: in 384 dimensions the nearest of 30k rows explains a few percent of a
residual; in 16 whitened dimensions it explains most of it. The latent's detail subspace is spanned by
the table's top ``G × d`` principal directions ``P`` ``(G·d, E)`` (orthonormal rows), read in ``G`` groups
of ``d`` coordinates, each group quantized with the same codes (product quantization).

The MiniLM codes ship in ``langmamba/resources/minilm_token_codes.npz`` (codes with 32 dimensions,
float16; 128 directions), so training needs neither the wheel nor the network; any ``d <= 32`` and
``G·d <= 128`` are leading columns and rows. :func:`principal_codes` rebuilds them from the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from langmamba.errors import ConfigError
from langmamba.io.atomic import write_npz

MINILM_CODES_PATH = Path(__file__).resolve().parent.parent / "resources" / "minilm_token_codes.npz"
MINILM_CODES_DIM = 32
MINILM_DIRECTIONS = 128


def minilm_token_table() -> torch.Tensor:
    """The word-piece embedding table ``(30522, 384)`` float32 of the packaged all-MiniLM-L6-v2."""
    from safetensors.torch import load_file

    from langmamba.vlm.text_encoder import packaged_model_path

    weights = load_file(str(Path(packaged_model_path()) / "model.safetensors"))
    return weights["embeddings.word_embeddings.weight"].float()


def principal_codes(table: torch.Tensor, dim: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (N, dim), projection (groups * dim, E))`` of a token table ``(N, E)`` (module docstring)."""
    directions = dim * groups
    if table.ndim != 2 or dim < 1 or groups < 1 or directions > min(table.shape):
        raise ConfigError(
            f"cannot take {groups} × {dim} principal directions of a token table of shape {tuple(table.shape)}"
        )
    centred = table.double() - table.double().mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = vh[:directions]
    # A singular vector's sign is arbitrary; fix it so the codes are reproducible.
    signs = torch.sign(projection[torch.arange(directions), projection.abs().argmax(dim=1)])
    projection = projection * signs[:, None]
    std = singular[:dim] / (table.shape[0] - 1) ** 0.5
    codes = centred @ projection[:dim].T / std
    return codes.float(), projection.float()


def minilm_codes(dim: int, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The packaged MiniLM detail codes: ``(codes (30522, dim), projection (groups * dim, 384))``."""
    if not 1 <= dim <= MINILM_CODES_DIM or not 1 <= dim * groups <= MINILM_DIRECTIONS:
        raise ConfigError(
            f"the packaged MiniLM token codes have at most {MINILM_CODES_DIM} dimensions and "
            f"{MINILM_DIRECTIONS} directions, asked {groups} × {dim}"
        )
    with np.load(MINILM_CODES_PATH) as archive:
        codes = torch.from_numpy(archive["codes"][:, :dim].astype(np.float32))
        projection = torch.from_numpy(archive["projection"][: dim * groups].astype(np.float32))
    return codes, projection


def write_minilm_codes(path: str | Path = MINILM_CODES_PATH) -> Path:
    """Rebuild the packaged MiniLM codes from the installed wheel (the maintainers' step; atomic write)."""
    codes, projection = principal_codes(minilm_token_table(), MINILM_CODES_DIM, MINILM_DIRECTIONS // MINILM_CODES_DIM)
    return write_npz(path, {"codes": codes.numpy().astype(np.float16), "projection": projection.numpy()})
