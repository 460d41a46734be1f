"""End-to-end speed and memory of ``langmamba denoise``: read, denoise, explain, write, on one volume.

``langmamba bench denoise --slices 64 --device cpu`` builds a synthetic 512² volume from the real slices of the
training sample ``lung1`` (tiled along z, back and forth, with Gaussian noise of ``--noise`` HU standing in for low
dose), writes it as a DICOM series (or ``--format nrrd``), and runs the same pipeline as the command line
(:class:`langmamba.job.DenoiseJob`, as ``langmamba denoise`` and the server run it) on it in a fresh process, so the
reported peak host memory (``ru_maxrss``) is that of the pipeline alone. ``--input PATH`` measures a given volume
instead.

``--runs N`` runs the pipeline N times in that process and reports the last run, as a server or a folder run
would see it once warm, with the first run's total (CUDA start-up, kernel compilation) beside it.

It reports slices/s, seconds per slice, the share of time in I/O (read + write of the volume, label map and colour
table) and in compute (denoising + explanations; the explanation JSON is streamed to disk while it is computed, so its
writing counts as compute, and so does the denoised series' writing when :mod:`langmamba.workers` processes do it
during the explanations), the peak RSS, and the model's achieved TFLOP/s: FLOPs of one slice counted with
:class:`torch.utils.flop_counter.FlopCounterMode` (plus the selective scans, which the counter does not see) times the
slices, over the compute time, against ``--peak-tflops`` (H100 dense bf16: 989) on CUDA."""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

H100_BF16_DENSE_TFLOPS = 989.0


def synthetic_volume(slices: int, size: int = 512, noise_hu: float = 25.0, seed: int = 0):
    """A ``(slices, size, size)`` CTVolume from lung1's real slices, tiled along z back and forth (0, 1, ...,
    n-1, n-1, ..., 0, 0, ...), centre-cropped or air-padded to ``size``, plus Gaussian noise of ``noise_hu``."""
    from langmamba.io import AIR_HU, read_volume
    from langmamba.sample_data import sample_path

    source = read_volume(sample_path("lung1"))
    depth, height, width = source.shape
    hu = np.full((slices, size, size), AIR_HU, dtype=np.float32)
    rows, cols = min(size, height), min(size, width)
    y0, x0 = (height - rows) // 2, (width - cols) // 2
    oy, ox = (size - rows) // 2, (size - cols) // 2
    rng = np.random.default_rng(seed)
    for z in range(slices):
        k = z % (2 * depth)
        k = k if k < depth else 2 * depth - 1 - k
        hu[z, oy : oy + rows, ox : ox + cols] = source.hu[k, y0 : y0 + rows, x0 : x0 + cols]
        hu[z] += rng.normal(0.0, noise_hu, size=(size, size)).astype(np.float32)
    np.rint(hu, out=hu)
    return source.with_hu(hu)


def _write_synthetic(path: str, slices: int, size: int, noise_hu: float, seed: int) -> str:
    from langmamba.io import write_volume

    volume = synthetic_volume(slices, size, noise_hu, seed)
    volume.dicom, volume.source = None, None
    return str(write_volume(volume, path, series_description="langmamba bench denoise input"))


def _count_flops(model, height: int, width: int, device: str) -> dict[str, float]:
    """FLOPs of denoising one ``height × width`` slice and of explaining it (LangAE encoding of input and
    output, quantizer), convolutions and matmuls by FlopCounterMode plus the decoder's selective scans."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from langmamba.bench.model import scan_flops
    from langmamba.infer import prepare_model
    from langmamba.runtime import resolve_device

    device = resolve_device(device)
    model = prepare_model(model, device)
    x = torch.rand(1, 1, height, width, device=device)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    denoise = float(counter.get_total_flops())
    side = height if height == width else round(math.sqrt(height * width))  # the scan count needs a square
    denoise += scan_flops(model, side)
    counter = FlopCounterMode(display=False)
    factor = model.langae.downsample_factor
    x = torch.rand(2, 1, -(-height // factor) * factor, -(-width // factor) * factor, device=device)
    with torch.no_grad(), counter:
        model.langae.quantize(model.langae.encode(x))
    return {"denoise": denoise, "explain": float(counter.get_total_flops())}


def _measure(config: dict) -> dict:
    """Run the pipeline once in this (fresh) process; timings, peak RSS and FLOPs."""
    import torch

    from langmamba.checkpoint import load_checkpoint
    from langmamba.job import DenoiseJob, JobOutputs
    from langmamba.runtime import default_weights

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    model = load_checkpoint(config["weights"] or default_weights())
    job = DenoiseJob(
        model, batch_size=config["batch_size"], device=config["device"], overwrite=True, progress=config["progress"]
    )
    device, batch_size = job.device, job.batch_size
    out = Path(config["workdir"])
    output = str(out / "denoised") + ("/" if config["format"] == "dicom" else ".nrrd")
    outputs = JobOutputs(
        output,
        explanations=out / "explanations.json" if config["explain"] else None,
        labels=out / "labels.nrrd" if config["labels"] else None,
        report=out / "report.html" if config["report"] else None,
    )
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    runs = []
    for _ in range(config["runs"]):
        started = time.perf_counter()
        timings = job.run(config["input"], outputs).timings
        runs.append({"timings_s": timings, "total_s": time.perf_counter() - started})
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    slices, height, width = _shape_of(output)
    flops = _count_flops(model, height, width, device)
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    return {
        "device": device,
        "batch_size": batch_size,
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
        "shape": [slices, height, width],
        **runs[-1],
        "first_total_s": runs[0]["total_s"],
        "runs": len(runs),
        "peak_rss_bytes": peak,
        "peak_rss_model_loaded_bytes": baseline,
        "flops_per_slice": flops,
    }


def _shape_of(path: str) -> tuple[int, int, int]:
    """``(Z, Y, X)`` of a written output from its headers (a DICOM series: one file per slice)."""
    if Path(path).is_dir():
        import pydicom

        files = sorted(Path(path).iterdir())
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        return len(files), int(first.Rows), int(first.Columns)
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return tuple(reversed(reader.GetSize()))


def _in_fresh_process(function, *args):
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def run(
    *,
    input_path: str | None = None,
    slices: int = 32,
    size: int = 512,
    noise_hu: float = 25.0,
    fmt: str = "dicom",
    device: str = "auto",
    batch_size: int | None = None,
    explain: bool = True,
    labels: bool = False,
    report: bool = False,
    weights: str | None = None,
    peak_tflops: float = H100_BF16_DENSE_TFLOPS,
    workdir: str | None = None,
    keep: bool = False,
    threads: int = 0,
    seed: int = 0,
    runs: int = 1,
    progress: bool = False,
) -> dict:
    """Build (or take) the volume, run the pipeline in a fresh process and summarise; see the module docstring."""
    from langmamba.errors import ConfigError

    if slices < 1 or size < 16 or runs < 1 or (batch_size is not None and batch_size < 1):
        raise ConfigError(
            f"slices, runs and batch size must be at least 1 and size at least 16, got {slices}, "
            f"{runs}, {batch_size}, {size}"
        )
    if fmt not in ("dicom", "nrrd"):
        raise ConfigError(f"format must be dicom or nrrd, got {fmt!r}")
    folder = Path(tempfile.mkdtemp(prefix="langmamba-bench-denoise-", dir=workdir))
    try:
        if input_path is None:
            target = str(folder / "input") + ("/" if fmt == "dicom" else ".nrrd")
            input_path = _in_fresh_process(_write_synthetic, target, slices, size, noise_hu, seed)
            source = f"synthetic from lung1, {slices}×{size}×{size}, noise {noise_hu:g} HU, {fmt}"
        else:
            source = str(input_path)
            fmt = "dicom" if Path(input_path).is_dir() else "nrrd"
        (folder / "out").mkdir()
        config = {
            "input": input_path,
            "workdir": str(folder / "out"),
            "format": fmt,
            "device": device,
            "batch_size": batch_size,
            "explain": explain,
            "labels": labels,
            "report": report,
            "weights": weights,
            "threads": threads,
            "progress": progress,
            "runs": runs,
        }
        measured = _in_fresh_process(_measure, config)
    finally:
        if not keep:
            shutil.rmtree(folder, ignore_errors=True)
    return summarise(
        measured,
        source=source,
        batch_size=measured["batch_size"],
        explain=explain,
        labels=labels,
        report=report,
        peak_tflops=peak_tflops,
        kept=str(folder) if keep else None,
    )


def summarise(
    measured: dict,
    *,
    source: str,
    batch_size: int,
    explain: bool,
    labels: bool,
    report: bool,
    peak_tflops: float,
    kept: str | None = None,
) -> dict:
    """The reported numbers from one measurement (see :func:`_measure`)."""
    t = measured["timings_s"]
    slices = measured["shape"][0]
    io_s = t.get("read", 0.0) + t.get("write", 0.0)
    compute_s = t.get("denoise", 0.0) + t.get("explain", 0.0)
    total = measured["total_s"]
    flops = measured["flops_per_slice"]
    per_slice = flops["denoise"] + (flops["explain"] if explain or labels or report else 0.0)
    achieved = per_slice * slices / compute_s / 1e12 if compute_s > 0 else None
    denoise_tflops = flops["denoise"] * slices / t["denoise"] / 1e12 if t.get("denoise") else None
    on_gpu = measured["device"].startswith("cuda")
    return {
        "benchmark": "denoise end to end",
        "source": source,
        "device": measured["device"],
        "device_name": measured["device_name"],
        "torch_threads": measured["torch_threads"],
        "shape": measured["shape"],
        "batch_size": batch_size,
        "outputs": {"explanations": explain, "labels": labels, "report": report},
        "runs": measured["runs"],
        "seconds": {k: round(v, 3) for k, v in t.items()} | {"total": round(total, 3)},
        "first_run_total_s": round(measured["first_total_s"], 3),
        "slices_per_s": round(slices / total, 4),
        "s_per_slice": round(total / slices, 4),
        "io_share": round(io_s / total, 4),
        "compute_share": round(compute_s / total, 4),
        "peak_rss_gb": round(measured["peak_rss_bytes"] / 1e9, 3),
        "peak_rss_model_loaded_gb": round(measured["peak_rss_model_loaded_bytes"] / 1e9, 3),
        "gflops_per_slice": {k: round(v / 1e9, 2) for k, v in flops.items()},
        "achieved_tflops": None if achieved is None else round(achieved, 4),
        "denoise_tflops": None if denoise_tflops is None else round(denoise_tflops, 4),
        "peak_tflops": peak_tflops,
        "model_flops_utilisation": round(achieved / peak_tflops, 5) if on_gpu and achieved else None,
        "kept_files": kept,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="langmamba bench denoise", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", help="a CT volume or DICOM series to measure (default: synthetic from lung1)")
    parser.add_argument("--slices", type=int, default=32, help="slices of the synthetic volume")
    parser.add_argument("--size", type=int, default=512, help="rows and columns of the synthetic volume")
    parser.add_argument("--noise", type=float, default=25.0, help="Gaussian noise of the synthetic volume (HU)")
    parser.add_argument(
        "--format", choices=["dicom", "nrrd"], default="dicom", help="format of the synthetic input and of the output"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="slices per batch (default: 4 on CUDA, 1 on the CPU)"
    )
    parser.add_argument(
        "--explain",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream the explanations JSON (default on)",
    )
    parser.add_argument("--labels", action="store_true", help="also write the label map")
    parser.add_argument("--report", action="store_true", help="also write the HTML report")
    parser.add_argument("--weights", help="LangMamba checkpoint (default: the shipped weights)")
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=H100_BF16_DENSE_TFLOPS,
        help="peak TFLOP/s of the accelerator (default: H100 dense bf16, 989)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--workdir", help="where the temporary volumes go (default: the system temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the input and outputs")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="run the pipeline this many times in the one process and report the last run (the "
        "first pays CUDA start-up and kernel compilation; a server pays them once)",
    )
    parser.add_argument("--progress", action="store_true", help="show the pipeline's progress bars")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = run(
        input_path=args.input,
        slices=args.slices,
        size=args.size,
        noise_hu=args.noise,
        fmt=args.format,
        device=args.device,
        batch_size=args.batch_size,
        explain=args.explain,
        labels=args.labels,
        report=args.report,
        weights=args.weights,
        peak_tflops=args.peak_tflops,
        workdir=args.workdir,
        keep=args.keep,
        threads=args.threads,
        runs=args.runs,
        progress=args.progress,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = result["seconds"]
    print(f"{result['source']} on {result['device_name']} ({result['device']}), batch {result['batch_size']}")
    print(
        f"  {result['slices_per_s']:.3f} slices/s, {result['s_per_slice']:.3f} s/slice end to end "
        f"({s['total']:.1f} s for {result['shape'][0]} slices)"
        + (
            f", run {result['runs']} of {result['runs']} in one process (the first took "
            f"{result['first_run_total_s']:.1f} s)"
            if result["runs"] > 1
            else ""
        )
    )
    print("  stages: " + ", ".join(f"{k} {v:.1f} s" for k, v in s.items() if k != "total"))
    print(f"  I/O {100 * result['io_share']:.1f}%, compute {100 * result['compute_share']:.1f}%")
    print(
        f"  peak host RSS {result['peak_rss_gb']:.2f} GB (after loading the model: "
        f"{result['peak_rss_model_loaded_gb']:.2f} GB)"
    )
    mfu = result["model_flops_utilisation"]
    print(
        f"  {result['gflops_per_slice']} GFLOP per slice; achieved {result['achieved_tflops']} TFLOP/s"
        + (f" = {100 * mfu:.2f}% of {result['peak_tflops']:g}" if mfu is not None else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
