"""How much of a residual LangAE's latent its quantizer can code: energy shares of the encoder's latent ``z``.

The residual quantizer (:mod:`langmamba.models.residual_quantizer`) subtracts word rows of the region vocabulary
(they span at most ``V`` directions of the ``E``-dimensional latent) and detail codes that live in the span of the
detail projection's ``G * d`` rows. Whatever part of ``z`` lies outside both spans can never be coded, and the image
decoder only ever sees the quantized latent. This prints, over training slices of a prepared set, the share of
``||z||²`` in the detail span, in the word span, in both together, and the share left in the quantization residual
``||z - ẑ||²`` (the trivial baseline, coding nothing, leaves 1.0). A LangAE with ``project_latent`` hands the decoder
the coded part ``z'`` of its latent only (:mod:`langmamba.models.residual_quantizer`); for it, ``decoded latent
residual`` is ``||z' - ẑ||² / ||z'||²``, what the quantizer loses of what the decoder would see (without
projection ``z' = z`` and the two residuals agree).

    .venv/bin/python scripts/latent_coverage.py weights/langae out/prep/training.npz [--slices 8]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from langmamba.checkpoint import load_checkpoint
from langmamba.data.prepared import load_prepared
from langmamba.eval_cases import spread_indices
from langmamba.normalization import hu_to_model


def coverage(langae: torch.nn.Module, slices: list[np.ndarray]) -> dict[str, float]:
    """Energy shares of the latent of ``slices`` (each ``(H, W)`` HU) under ``langae``'s residual quantizer."""
    quantizer = langae.quantizer
    detail = quantizer.detail_projection.float().T  # (E, G·d), orthonormal columns
    words = torch.linalg.qr(quantizer.codebook.float().T).Q  # (E, V) basis of the word span
    both = torch.linalg.qr(torch.cat([detail, words], dim=1)).Q
    total = {"detail span": 0.0, "word span": 0.0, "both spans": 0.0, "quantization residual": 0.0}
    decoded = {"energy": 0.0, "residual": 0.0}
    energy = 0.0
    factor = langae.downsample_factor
    for hu in slices:
        hu = hu[: hu.shape[0] // factor * factor, : hu.shape[1] // factor * factor]
        with torch.no_grad():
            z = langae.encode(torch.from_numpy(hu_to_model(hu.astype(np.float32)))[None, None])
            out = langae.quantize(z)
        quantized, coded = out.quantized, out.continuous
        decoded["energy"] += float(coded.pow(2).sum())
        decoded["residual"] += float((coded - quantized).pow(2).sum())
        flat, residual = z[0].flatten(1), (z - quantized)[0].flatten(1)
        energy += float(flat.pow(2).sum())
        total["detail span"] += float((detail.T @ flat).pow(2).sum())
        total["word span"] += float((words.T @ flat).pow(2).sum())
        total["both spans"] += float((both.T @ flat).pow(2).sum())
        total["quantization residual"] += float(residual.pow(2).sum())
    shares = {name: value / energy for name, value in total.items()}
    return shares | {"decoded latent residual": decoded["residual"] / decoded["energy"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("langae", help="a residual LangAE checkpoint folder (e.g. weights/langae)")
    parser.add_argument("data", help="a prepared training set (.npz of `make prepare`)")
    parser.add_argument("--slices", type=int, default=8, help="training slices, spread over the set (default 8)")
    args = parser.parse_args(argv)
    langae = load_checkpoint(args.langae).float().eval()
    if not hasattr(langae.quantizer, "detail_projection"):
        parser.error(f"{args.langae} has no residual quantizer")
    training = [np.asarray(s.full) for s in load_prepared(args.data)[0] if getattr(s, "role", None) == "training"]
    if not training:
        parser.error(f"{args.data} has no training slices")
    chosen = [training[i] for i in spread_indices(len(training), args.slices)]
    print(json.dumps({"slices": len(chosen), **coverage(langae, chosen)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
