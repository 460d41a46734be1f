"""Benchmark of the MONAI Label app: server overhead over in-process denoising, and throughput under concurrency.

1. Overhead: the held-out lung2 volume (512x512x61) denoised in-process (read NRRD, ``denoise_volume``, write
   NRRD; model already loaded, as in the server) versus one ``POST /infer/langmamba_denoise?output=image`` upload
   of the same file to a real ``monailabel start_server`` on loopback (``explain: false`` for both).
2. Throughput: 1, 2 and 4 concurrent clients, each sending one request with the first ``--slices`` slices of lung2;
   slices per second over the wall time of each round.

Usage: ``.venv/bin/python scripts/bench_server.py [--device cpu] [--slices 8] [--json out/bench_server.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from langmamba.checkpoint import load_checkpoint  # noqa: E402
from langmamba.denoise import default_weights, denoise_volume  # noqa: E402
from langmamba.io import read_volume, write_volume  # noqa: E402
from langmamba.sample_data import sample_path  # noqa: E402
from tests.servers import MonaiLabelServer, crop  # noqa: E402


def in_process(source: Path, output: Path, device: str) -> float:
    model = load_checkpoint(default_weights())
    start = time.perf_counter()
    volume = read_volume(source)
    denoised = denoise_volume(model, volume, device=device)
    write_volume(denoised, output, overwrite=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=8, help="slices per request in the throughput rounds")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results: dict = {"machine": {"cpu_count": torch.get_num_threads(), "platform": platform.platform(),
                                 "torch_threads": torch.get_num_threads(), "device": args.device}}
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        tmp = Path(tmp)
        lung2 = read_volume(sample_path("lung2"))
        full = tmp / "lung2.nrrd"
        write_volume(lung2, full)
        part = tmp / "part.nrrd"
        write_volume(crop(lung2, slice(0, args.slices), slice(None), slice(None)), part)
        params = {"explain": False, "device": args.device}

        local_s = in_process(full, tmp / "local.nrrd", args.device)
        results["in_process_s"] = round(local_s, 2)
        print(f"in-process 512x512x61: {local_s:.1f} s", flush=True)

        (tmp / "studies").mkdir()
        server = MonaiLabelServer(tmp / "studies", tmp)
        try:
            start = time.perf_counter()
            response = server.infer(upload=full, output="image", params=params)
            server_s = time.perf_counter() - start
            response.raise_for_status()
            results["server_s"] = round(server_s, 2)
            results["overhead_s"] = round(server_s - local_s, 2)
            results["overhead_pct"] = round(100 * (server_s - local_s) / local_s, 1)
            print(f"server 512x512x61: {server_s:.1f} s (overhead {server_s - local_s:+.1f} s, "
                  f"{results['overhead_pct']:+.1f} %)", flush=True)

            rounds = []
            for clients in args.clients:
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    responses = list(pool.map(lambda _: server.infer(upload=part, output="image", params=params),
                                              range(clients)))
                wall = time.perf_counter() - start
                for r in responses:
                    r.raise_for_status()
                rate = clients * args.slices / wall
                rounds.append({"clients": clients, "requests": clients, "slices_per_request": args.slices,
                               "wall_s": round(wall, 2), "slices_per_s": round(rate, 2),
                               "requests_per_min": round(60 * clients / wall, 2)})
                print(f"{clients} concurrent client(s): {wall:.1f} s, {rate:.2f} slices/s", flush=True)
            results["throughput"] = rounds
        finally:
            server.stop()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
