"""Detail codes from a language model's frozen token-embedding table, for the residual quantizer.

The region vocabulary (about a hundred words) says what a region is but carries far too few bits to
rebuild the image. The LangAE's finest residual codes therefore come from the language model's whole
token table (all-MiniLM-L6-v2: 30,522 word pieces × 384; CLIP: its BPE token embeddings), read through
a fixed linear map: the table's top ``d`` principal directions ``P`` ``(d, E)`` (orthonormal rows), and
each token's coordinates along them divided by that direction's standard deviation (whitened), so the
``N × d`` codes spread evenly over ``d`` dimensions. In 384 dimensions the nearest of 30k rows explains
a few percent of a residual; in 16 whitened dimensions it explains most of it.

The MiniLM codes ship in ``langmamba/resources/minilm_token_codes.npz`` (``d`` = 32, float16; any
``d <= 32`` is its first ``d`` columns and rows), so training needs neither the wheel nor the network;
:func:`principal_codes` rebuilds them from the table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from langmamba.errors import ConfigError

MINILM_CODES_PATH = Path(__file__).resolve().parent.parent / "resources" / "minilm_token_codes.npz"
MINILM_CODES_DIM = 32


def minilm_token_table() -> torch.Tensor:
    """The word-piece embedding table ``(30522, 384)`` float32 of the packaged all-MiniLM-L6-v2."""
    from safetensors.torch import load_file

    from langmamba.vlm.text_encoder import packaged_model_path

    weights = load_file(str(Path(packaged_model_path()) / "model.safetensors"))
    return weights["embeddings.word_embeddings.weight"].float()


def principal_codes(table: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes (N, dim), projection (dim, E))`` of a token table ``(N, E)`` (see the module docstring)."""
    if table.ndim != 2 or not 1 <= dim <= min(table.shape):
        raise ConfigError(f"cannot take {dim} principal directions of a token table of shape {tuple(table.shape)}")
    centred = table.double() - table.double().mean(dim=0)
    _, singular, vh = torch.linalg.svd(centred, full_matrices=False)
    projection = vh[:dim]
    # A singular vector's sign is arbitrary; fix it so the codes are reproducible.
    signs = torch.sign(projection[torch.arange(dim), projection.abs().argmax(dim=1)])
    projection = projection * signs[:, None]
    std = singular[:dim] / (table.shape[0] - 1) ** 0.5
    codes = centred @ projection.T / std
    return codes.float(), projection.float()


def minilm_codes(dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packaged MiniLM detail codes for ``dim <= 32``: ``(codes (30522, dim), projection (dim, 384))``."""
    if not 1 <= dim <= MINILM_CODES_DIM:
        raise ConfigError(f"the packaged MiniLM token codes have at most {MINILM_CODES_DIM} dimensions, asked {dim}")
    with np.load(MINILM_CODES_PATH) as archive:
        codes = torch.from_numpy(archive["codes"][:, :dim].astype(np.float32))
        projection = torch.from_numpy(archive["projection"][:dim].astype(np.float32))
    return codes, projection


def write_minilm_codes(path: str | Path = MINILM_CODES_PATH) -> Path:
    """Rebuild the packaged MiniLM codes from the installed wheel (the maintainers' step; atomic write)."""
    import os

    codes, projection = principal_codes(minilm_token_table(), MINILM_CODES_DIM)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.npz")
    np.savez_compressed(tmp, codes=codes.numpy().astype(np.float16), projection=projection.numpy())
    os.replace(tmp, path)
    return path
