"""Speed and size of LangMamba (frozen LangAE encoder + Mamba decoder) on slices of a given size.

``python -m langmamba.bench.model --size 512 --device cpu`` prints one JSON object: parameters,
GFLOPs per slice, peak memory, seconds per slice, slices per second and the selective-scan backend
that ran. Weights are random (speed does not depend on them); the LangAE has the paper's widths.
CPU runs are fp32; CUDA runs use bf16 autocast unless ``dtype="float32"``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from collections.abc import Sequence

import torch

from langmamba.errors import ConfigError
from langmamba.models.denoiser import LangMamba
from langmamba.models.langae import LangAE
from langmamba.models.ss2d import SS2D, cross_scan
from langmamba.ops import resolve_backend, selective_scan
from langmamba.runtime import resolve_device, synchronize

logger = logging.getLogger(__name__)

_SCAN_FLOPS_PER_STATE = 7
"""Per (channel, state, token): decay mul + exp, input mul, state mul + add, read-out mul + add."""


def scan_flops(model: LangMamba, size: int) -> float:
    """Selective-scan FLOPs of one ``size``² slice (not seen by the flop counter), from the SS2D shapes."""
    total = 0.0
    for name, module in model.decoder.named_modules():
        if not isinstance(module, SS2D):
            continue
        level = int(name.split(".")[1])  # decoder.levels[i] works at size / 2^i
        side = -(-size // 2**level)
        side_even = side + (side % 2 if module.step == 2 else 0)
        tokens = cross_scan(torch.empty(1, 1, side_even, side_even), module.step).shape[-1]
        total += _SCAN_FLOPS_PER_STATE * 4 * module.d_inner * module.d_state * tokens
    return total


def _count_flops(model: LangMamba, size: int, device: torch.device) -> tuple[float, float]:
    """(total, decoder) FLOPs of convolutions and matmuls for one ``size``² slice."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand(1, 1, size, size, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    decoder = sum(counter.get_flop_counts().get(f"{type(model).__name__}.decoder", {}).values())
    return float(counter.get_total_flops()), float(decoder)


def _profile(model: LangMamba, x: torch.Tensor, autocast, batch: int, device: torch.device) -> list:
    """``[operator, milliseconds per slice]`` of the 15 most expensive operators of one forward."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.inference_mode(), autocast, profile(activities=activities) as prof:
        model(x)
        synchronize(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0.0), reverse=True)[:15]
    return [[e.key[:60], round(getattr(e, key, 0.0) / 1e3 / batch, 4)] for e in events]


def build_model(decoder_kwargs: dict | None = None, scan_backend: str = "auto") -> LangMamba:
    """LangMamba with the paper's LangAE (random weights, 512-word codebook of dim 384) and the default decoder."""
    langae_config = LangAE(codebook_size=512, codebook_dim=384).get_config()
    return LangMamba(langae_config, scan_backend=scan_backend, **(decoder_kwargs or {}))


def run(
    size: int = 512,
    batch: int | None = None,
    device: str = "auto",
    dtype: str | None = None,
    steps: int = 5,
    warmup: int = 2,
    threads: int | None = None,
    scan_backend: str = "auto",
    decoder_kwargs: dict | None = None,
    compile_model: bool = False,
    count_flops: bool = True,
    channels_last: bool = False,
    profile: bool = False,
) -> dict:
    """Time ``steps`` forward passes of LangMamba on ``(batch, 1, size, size)`` and describe the model.

    Args:
        size: slice side in pixels.
        batch: slices per forward; default 1 on CPU, 64 on CUDA.
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
        dtype: ``"float32"`` or ``"bfloat16"`` (autocast); default fp32 on CPU, bf16 on CUDA.
        steps: timed forward passes.
        warmup: untimed passes first (kernel selection, Triton compilation).
        threads: CPU threads for PyTorch (default: leave as is).
        scan_backend: selective-scan backend of the SS2D blocks.
        decoder_kwargs: DecoderConfig fields overriding the defaults (widths, depths ...).
        compile_model: run the decoder through ``torch.compile``.
        channels_last: use the channels-last memory format for the model and input (faster convolutions
            on tensor cores).
        profile: add the 15 operators that took most device (or CPU) time, per slice.
        count_flops: count GFLOPs with ``torch.utils.flop_counter`` (one extra fp32 forward at batch 1).

    Returns:
        A JSON-serialisable dict: ``device``, ``dtype``, ``batch``, ``size``, ``threads``,
        ``scan_backend``, ``params_total``, ``params_decoder``, ``params_encoder``, ``gflops_per_slice``
        and ``gflops_decoder_per_slice`` (convolutions and matmuls, counted), ``scan_gflops_per_slice``
        (analytic, not in the counted numbers), ``seconds_per_slice``, ``slices_per_second``,
        ``encoder_seconds_per_slice`` (the frozen LangAE feature pass alone), ``peak_memory_mb`` (CUDA
        allocator peak, or the process's peak RSS on CPU), ``decoder`` (the decoder configuration) and,
        with ``profile``, ``top_kernels_ms_per_slice``.
    """
    dev = resolve_device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available")
    if threads is not None:
        torch.set_num_threads(int(threads))
    batch = batch or (64 if dev.type == "cuda" else 1)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")

    torch.manual_seed(0)
    model = build_model(decoder_kwargs, scan_backend).to(dev).eval()
    backend = resolve_backend(scan_backend, dev)
    params_encoder = sum(p.numel() for p in model.langae.encoder.parameters())
    params_decoder = sum(p.numel() for p in model.decoder.parameters())
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "batch": batch,
        "size": size,
        "threads": torch.get_num_threads(),
        "scan_backend": backend,
        "params_total": sum(p.numel() for p in model.parameters()),
        "params_decoder": params_decoder,
        "params_encoder": params_encoder,
        "decoder": model.get_config()["decoder"],
    }
    if count_flops:
        total, decoder = _count_flops(model, size, dev)
        result["gflops_per_slice"] = total / 1e9
        result["gflops_decoder_per_slice"] = decoder / 1e9
    result["scan_gflops_per_slice"] = scan_flops(model, size) / 1e9
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if compile_model:
        # The frozen encoder's feature pass and the decoder; the Triton scan stays an opaque call.
        model.langae.encoder.features = torch.compile(model.langae.encoder.features)
        model.decoder = torch.compile(model.decoder)
        result["compiled"] = True

    x = torch.rand(batch, 1, size, size, device=dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        result["channels_last"] = True
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def timed(fn) -> float:
        """Seconds per slice of ``fn(x)`` over ``steps`` passes after ``warmup`` passes."""
        with torch.inference_mode(), autocast:
            for _ in range(warmup):
                fn(x)
            synchronize(dev)
            start = time.perf_counter()
            for _ in range(steps):
                fn(x)
            synchronize(dev)
        return (time.perf_counter() - start) / (steps * batch)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    per_slice = timed(model)
    result["seconds_per_slice"] = per_slice
    result["slices_per_second"] = 1.0 / per_slice
    if dev.type == "cuda":
        result["peak_memory_mb"] = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        # ru_maxrss is in KiB on Linux.
        result["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["encoder_seconds_per_slice"] = timed(model.langae.encode_features)
    if profile:
        result["top_kernels_ms_per_slice"] = _profile(model, x, autocast, batch, dev)
    logger.info("LangMamba %s×%s on %s: %.4f s/slice", size, size, result["device"], per_slice)
    return result


def scan_shapes(model: LangMamba, size: int, batch: int) -> list[dict]:
    """The selective-scan calls of one forward on ``(batch, 1, size, size)``: one dict per SS2D with
    ``batch``, ``channels`` (4 directions × d_inner), ``state``, ``length`` and ``groups`` (4)."""
    shapes = []
    for name, module in model.decoder.named_modules():
        if isinstance(module, SS2D):
            side = -(-size // 2 ** int(name.split(".")[1]))
            side += side % 2 if module.step == 2 else 0
            length = cross_scan(torch.empty(1, 1, side, side), module.step).shape[-1]
            shapes.append(
                {"batch": batch, "channels": 4 * module.d_inner, "state": module.d_state, "length": length, "groups": 4}
            )
    return shapes


def run_scan(
    size: int = 512,
    batch: int | None = None,
    device: str = "auto",
    backends: Sequence[str] | None = None,
    triton_configs: Sequence[tuple[int, int]] = (),
    steps: int = 10,
    backward: bool = False,
    decoder_kwargs: dict | None = None,
) -> dict:
    """Time the selective scan alone at the SS2D shapes of a LangMamba forward.

    Inputs are bf16 on CUDA (as under autocast) and fp32 on CPU. ``triton_configs`` adds Triton runs
    with explicit ``(block_l, num_warps)``. Returns, per backend (and Triton config), the milliseconds
    of all scans of one forward of ``batch`` slices and per slice, forward only or forward + backward.
    """
    dev = resolve_device(device)
    batch = batch or (64 if dev.type == "cuda" else 1)
    model = build_model(decoder_kwargs)
    shapes = scan_shapes(model, size, batch)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    runs: list[tuple[str, dict]] = [(name, {"backend": name}) for name in (backends or [resolve_backend("auto", dev)])]
    runs += [(f"triton_{bl}x{nw}", {"block_l": bl, "num_warps": nw}) for bl, nw in triton_configs]
    generator = torch.Generator().manual_seed(0)
    cases = []
    for shape in shapes:
        b, d, n, length, g = (shape[k] for k in ("batch", "channels", "state", "length", "groups"))

        def rand(*dims: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*dims, generator=generator) * scale).to(dev)

        tensors = {
            "u": rand(b, d, length).to(dtype),
            "delta": rand(b, d, length, scale=0.5).to(dtype),
            "A": -(torch.rand(d, n, generator=generator) * n + 1).to(dev),
            "B": rand(b, g, n, length).to(dtype),
            "C": rand(b, g, n, length).to(dtype),
            "D": rand(d),
            "delta_bias": rand(d, scale=0.5),
        }
        if backward:
            for key in ("u", "delta", "B", "C"):
                tensors[key].requires_grad_(True)
        cases.append(tensors)

    def call(options: dict, tensors: dict) -> None:
        if "backend" in options:
            out = selective_scan(**tensors, delta_softplus=True, backend=options["backend"])
        else:
            from langmamba.ops.selective_scan_triton import selective_scan_triton

            out = selective_scan_triton(**tensors, delta_softplus=True, **options)
        if backward:
            out.float().sum().backward()

    results = {}
    for label, options in runs:
        with torch.set_grad_enabled(backward):
            for tensors in cases:
                call(options, tensors)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            start = time.perf_counter()
            for _ in range(steps):
                for tensors in cases:
                    call(options, tensors)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        ms = (time.perf_counter() - start) / steps * 1e3
        results[label] = {"ms_per_forward": ms, "ms_per_slice": ms / batch}
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "size": size,
        "batch": batch,
        "backward": backward,
        "shapes": shapes,
        "results": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m langmamba.bench.model [--size 512] [--batch N] [--device auto] ...``."""
    parser = argparse.ArgumentParser(description="Time LangMamba (frozen LangAE + Mamba decoder) on random slices.")
    parser.add_argument("--size", type=int, default=512, help="slice side in pixels (default 512)")
    parser.add_argument("--batch", type=int, default=None, help="slices per forward (default 1 CPU, 64 CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default fp32 CPU, bf16 CUDA")
    parser.add_argument("--steps", type=int, default=5, help="timed forward passes")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes first")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads")
    parser.add_argument("--scan-backend", default="auto", help="selective-scan backend")
    parser.add_argument("--decoder", default=None, help="JSON dict of DecoderConfig fields to override")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--profile", action="store_true", help="list the most expensive operators")
    parser.add_argument("--scan", action="store_true", help="time the selective scans alone (see run_scan)")
    parser.add_argument("--backends", default=None, help="comma-separated scan backends for --scan")
    parser.add_argument("--triton-configs", default="", help="for --scan: e.g. 64x4,128x8 (block_l x num_warps)")
    parser.add_argument("--backward", action="store_true", help="for --scan: time forward + backward")
    args = parser.parse_args(argv)
    try:
        decoder_kwargs = json.loads(args.decoder) if args.decoder else None
    except json.JSONDecodeError as error:
        raise ConfigError(f"--decoder is not valid JSON: {error}") from error
    if args.scan:
        configs = [tuple(int(v) for v in c.split("x")) for c in args.triton_configs.split(",") if c]
        result = run_scan(
            size=args.size,
            batch=args.batch,
            device=args.device,
            backends=args.backends.split(",") if args.backends else None,
            triton_configs=configs,
            steps=args.steps,
            backward=args.backward,
            decoder_kwargs=decoder_kwargs,
        )
        sys.stdout.write(json.dumps(result, indent=1) + "\n")
        return 0
    result = run(
        size=args.size,
        batch=args.batch,
        device=args.device,
        dtype=args.dtype,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        scan_backend=args.scan_backend,
        decoder_kwargs=decoder_kwargs,
        compile_model=args.compile,
        count_flops=not args.no_flops,
        channels_last=args.channels_last,
        profile=args.profile,
    )
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
