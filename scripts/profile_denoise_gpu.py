"""Where the time of ``langmamba denoise --explain`` goes once the model is warm, stage by stage, in one process.

Usage: python scripts/profile_denoise_gpu.py [--slices 300] [--batch-size 32] [--device cuda] [--lung1-npz F]

Times, on the synthetic volume of ``langmamba bench denoise`` (lung1's real slices tiled along z): slice
denoising (cold, then warm), the model's forward alone, the explanation encoder pass, building the per-region
records in Python and serialising them with ``json.dumps``. ``--lung1-npz`` (arrays ``hu``, ``spacing``,
``origin``, ``direction``) stands in for the sample study on hosts without SimpleITK.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from langmamba.checkpoint import load_checkpoint
from langmamba.denoise import default_weights
from langmamba.explain import _Explainer
from langmamba.infer import denoise_slices, prepare_model
from langmamba.normalization import hu_to_model
from langmamba.simulate._tensor import resolve_device


def lung1_volume(npz: str | None, slices: int) -> np.ndarray:
    """``(slices, 512, 512)`` HU: lung1 tiled along z, like the benchmark's synthetic volume (without its noise)."""
    if npz is None:
        from langmamba.bench.denoise import synthetic_volume

        return synthetic_volume(slices, noise_hu=0.0).hu
    hu = np.load(npz)["hu"].astype(np.float32)
    return np.concatenate([hu] * (slices // len(hu) + 1))[:slices]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lung1-npz")
    args = parser.parse_args()
    device = resolve_device(args.device)
    hu = lung1_volume(args.lung1_npz, args.slices)
    model = load_checkpoint(default_weights())
    n, bs = len(hu), args.batch_size

    def timed(label: str, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        print(f"{label}: {time.perf_counter() - start:.3f} s", flush=True)
        return result

    timed(f"denoise {n} slices, batch {bs}, first call", lambda: denoise_slices(model, hu, batch_size=bs, device=device))
    denoised = timed(f"denoise {n} slices, warm", lambda: denoise_slices(model, hu, batch_size=bs, device=device))
    net = prepare_model(model, device)
    x = torch.from_numpy(hu_to_model(hu[:bs]))[:, None].to(device)
    batches = -(-n // bs)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        net(x)
        timed(f"model forward alone, {batches} batches", lambda: [net(x) for _ in range(batches)])
    explainer = _Explainer(model, hu, denoised, None, (0, 1, 2), 3, bs, device)
    starts = range(0, n, bs)
    explainer._batch_scores(0, min(bs, n))
    scores = timed("explanation encoder + word scores (input and output)",
                   lambda: [explainer._batch_scores(s, min(s + bs, n)) for s in starts])
    entries = timed("region records in Python", lambda: [
        {"z": z, "levels": [explainer._regions(z, level, batch[level], z - s) for level in explainer.levels]}
        for s, batch in zip(starts, scores) for z in range(s, min(s + bs, n))])
    size = timed("json.dumps", lambda: sum(len(json.dumps(entry)) for entry in entries))
    print(f"explanation JSON: {size / 1e6:.1f} MB for {n} slices")


if __name__ == "__main__":
    main()
