"""Where the time of ``langmamba denoise --explain`` goes once the model is warm, stage by stage, in one process.

Usage: python scripts/profile_denoise_gpu.py [--slices 300] [--batch-size 32] [--device cuda] [--lung1-npz F]

Times, on the synthetic volume of ``langmamba bench denoise`` (lung1's real slices tiled along z): slice
denoising (cold, then warm), the model's forward alone, the explanation encoder pass (with and without the
prefetching thread, and a CUDA kernel table of one batch), and formatting the per-region JSON text.
``--lung1-npz`` (arrays ``hu``, ``spacing``, ``origin``, ``direction``) stands in for the sample study on hosts
without SimpleITK.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from langmamba.checkpoint import load_checkpoint
from langmamba.explain import Explainer
from langmamba.explain.document import TextFormat, slice_texts
from langmamba.infer import denoise_hu_array, prepare_model
from langmamba.normalization import hu_to_model
from langmamba.runtime import default_weights, resolve_device


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

    timed(
        f"denoise {n} slices, batch {bs}, first call", lambda: denoise_hu_array(model, hu, batch_size=bs, device=device)
    )
    denoised = timed(f"denoise {n} slices, warm", lambda: denoise_hu_array(model, hu, batch_size=bs, device=device))
    net = prepare_model(model, device)
    x = hu_to_model(torch.from_numpy(hu[:bs]).to(device))[:, None]
    batches = -(-n // bs)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        net(x)
        timed(f"model forward alone, {batches} batches", lambda: [net(x) for _ in range(batches)])
    half = max(1, bs // 2)  # what langmamba denoise uses: the encoder sees input and output of half a batch
    explainer = Explainer(model, hu, denoised, None, (0, 1, 2), 3, half, device)
    list(explainer.batches())
    explained = timed(
        f"explanation encoder + word scores, batch {half} (input and output), prefetching",
        lambda: list(explainer.batches()),
    )
    timed("the same, one batch after the other", lambda: [explainer.encode_batch(s) for s in range(0, n, half)])
    x = hu_to_model(torch.from_numpy(np.concatenate([hu[:half], denoised[:half]])).to(device))[:, None]
    with torch.inference_mode():
        langae = explainer.langae
        timed("explanation encoder alone", lambda: [langae.encode(x) for _ in range(0, n, half)])
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                langae.quantize(langae.encode(x))
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        denoise_hu_array(model, hu, batch_size=bs, device=device)
        timed("with cudnn.benchmark: denoise, warm", lambda: denoise_hu_array(model, hu, batch_size=bs, device=device))
        list(explainer.batches())
        timed("with cudnn.benchmark: explanation encoder + word scores", lambda: list(explainer.batches()))
        torch.backends.cudnn.benchmark = False
    text_format = TextFormat.build(
        explainer.boxes, explainer.grids, explainer.affine, explainer.vocabulary, explainer.top_k
    )
    texts = timed(
        "JSON text of the regions, one process",
        lambda: [t for batch in explained for t in slice_texts(text_format, batch.start, batch.levels)],
    )
    print(f"explanation JSON: {sum(map(len, texts)) / 1e6:.1f} MB for {n} slices")
    timed(
        "region dicts of one batch (explain_volume parses the text)",
        lambda: [json.loads(t) for t in texts[: len(explained[0].levels[0].change)]],
    )


if __name__ == "__main__":
    main()
