"""Benchmark of the MONAI Label app: server overhead over in-process denoising, and throughput under concurrency.

1. Overhead: the held-out lung2 volume (512x512x61) denoised in-process (read NRRD, ``denoise_ct_volume``, write
   NRRD; model already loaded, as in the server) versus one ``POST /infer/langmamba_denoise?output=image`` upload
   of the same file to a real ``monailabel start_server`` on loopback (``explain: false`` for both). Besides the
   raw difference of wall times (sensitive to other load on the machine), the overhead outside the model is
   reported: (server wall - the server's own denoise time, from the ``X-LangMamba-Timings`` header) minus
   (in-process wall - in-process denoise time), i.e. what HTTP, the upload, temporary files and the response
   add beyond langmamba's own reading and writing.
2. Throughput: 1, 2 and 4 concurrent clients, each sending ``--requests-per-client`` requests (one after the
   other) with the first ``--slices`` slices of lung2; slices per second over the wall time of each round.

Usage: ``.venv/bin/python scripts/bench_server.py [--device cpu] [--slices 8] [--json out/bench_server.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
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
from langmamba.infer import denoise_ct_volume  # noqa: E402
from langmamba.io import read_volume, write_volume  # noqa: E402
from langmamba.runtime import default_weights  # noqa: E402
from langmamba.sample_data import sample_path  # noqa: E402
from tests.servers import MonaiLabelServer, crop  # noqa: E402

TIMINGS_HEADER = "X-LangMamba-Timings"


def in_process(model, source: Path, output: Path, device: str) -> dict:
    """Seconds to read, denoise and write ``source`` with a loaded model."""
    start = time.perf_counter()
    volume = read_volume(source)
    read = time.perf_counter()
    denoised = denoise_ct_volume(model, volume, device=device)
    done = time.perf_counter()
    write_volume(denoised, output, overwrite=True)
    end = time.perf_counter()
    return {
        "wall": round(end - start, 2),
        "read": round(read - start, 2),
        "denoise": round(done - read, 2),
        "write": round(end - done, 2),
    }


def on_server(server: MonaiLabelServer, source: Path, params: dict) -> dict:
    """Seconds for one upload with ``output=image``, and the server's own timings of it."""
    start = time.perf_counter()
    response = server.infer(upload=source, output="image", params=params)
    wall = time.perf_counter() - start
    response.raise_for_status()
    return {"wall": round(wall, 2), "server": json.loads(response.headers[TIMINGS_HEADER])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--slices", type=int, default=8, help="slices per request in the throughput rounds")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1, help="alternating in-process/server runs of the overhead")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    results: dict = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": args.device,
            "load_average_at_start": os.getloadavg(),
        }
    }
    with tempfile.TemporaryDirectory(prefix="bench-server-") as tmp:
        tmp = Path(tmp)
        lung2 = read_volume(sample_path("lung2"))
        full = tmp / "lung2.nrrd"
        write_volume(lung2, full)
        part = tmp / "part.nrrd"
        write_volume(crop(lung2, slice(0, args.slices), slice(None), slice(None)), part)
        params = {"explain": False, "device": args.device}

        model = load_checkpoint(default_weights())
        (tmp / "studies").mkdir()
        server = MonaiLabelServer(tmp / "studies", tmp)
        try:
            runs = []
            for _ in range(args.repeats):
                local = in_process(model, full, tmp / "local.nrrd", args.device)
                remote = on_server(server, full, params)
                outside = (remote["wall"] - remote["server"]["denoise"]) - (local["wall"] - local["denoise"])
                runs.append(
                    {
                        "in_process_s": local,
                        "server_s": remote,
                        "overhead_wall_s": round(remote["wall"] - local["wall"], 2),
                        "overhead_outside_model_s": round(outside, 2),
                    }
                )
                print(
                    f"512x512x61: in-process {local['wall']:.1f} s (model {local['denoise']:.1f} s), server "
                    f"{remote['wall']:.1f} s (model {remote['server']['denoise']:.1f} s); overhead outside the "
                    f"model {outside:+.2f} s",
                    flush=True,
                )
            results["overhead"] = runs

            rounds = []
            for clients in args.clients:
                start = time.perf_counter()
                count = clients * args.requests_per_client

                def client(_: int) -> None:
                    for _ in range(args.requests_per_client):
                        server.infer(upload=part, output="image", params=params).raise_for_status()

                with ThreadPoolExecutor(clients) as pool:
                    list(pool.map(client, range(clients)))
                wall = time.perf_counter() - start
                rate = count * args.slices / wall
                rounds.append(
                    {
                        "clients": clients,
                        "requests": count,
                        "slices_per_request": args.slices,
                        "wall_s": round(wall, 2),
                        "slices_per_s": round(rate, 2),
                        "requests_per_min": round(60 * count / wall, 2),
                    }
                )
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
