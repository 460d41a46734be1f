"""Gain and cost of test-time flip averaging (``denoise_hu_array(..., tta=True)``: the 8 dihedral flips/rotations).

Runs the shipped LangMamba with and without averaging on the validation cases of an evaluation cases file (never
``lung2``; at most ``--max-slices`` slices of each), each at the given doses with noise drawn as the evaluation
draws it (``evaluate.case_seed``, draw 0), and prints the PSNR in [-160, 240] HU per case and dose, the mean gain
with a paired bootstrap 95 % interval over the (case, dose) pairs, and the ratio of wall times. Usage (from the
repository root):

    .venv/bin/langmamba evaluate --export-npz out/eval/cases.npz --validation-data out/prep/training.npz
    .venv/bin/python scripts/measure_tta.py out/eval/cases.npz --weights weights/langmamba --output out/tta.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from langmamba import metrics
from langmamba.checkpoint import load_checkpoint
from langmamba.eval_cases import load_cases, spread_indices
from langmamba.evaluate import EVALUATION_SEED, case_seed, simulate_case
from langmamba.infer import denoise_hu_array
from langmamba.io.atomic import write_text
from langmamba.runtime import default_batch_size, resolve_device


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", help="an evaluation cases .npz (langmamba evaluate --export-npz)")
    parser.add_argument("--weights", default="weights/langmamba")
    parser.add_argument("--doses", default="0.25,0.1")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-slices", type=int, default=2, help="slices per case at most, evenly spaced")
    parser.add_argument("--output", help="write the result as JSON here")
    args = parser.parse_args()

    device = str(resolve_device(args.device))
    model = load_checkpoint(args.weights)
    batch = default_batch_size(device)
    window = metrics.WINDOWS["-160_240"]
    rows, seconds = [], {"plain": 0.0, "tta": 0.0}
    for case in (c for c in load_cases(args.cases) if c.role == "validation"):
        keep = spread_indices(case.hu.shape[0], args.max_slices)
        case = dataclasses.replace(case, hu=case.hu[keep], label=None)
        for dose in (float(d) for d in args.doses.split(",")):
            low = simulate_case(case, dose, case_seed(EVALUATION_SEED, case.name, dose, 0), device)
            scores = {}
            for name, tta in (("plain", False), ("tta", True)):
                clock = time.perf_counter()
                out = denoise_hu_array(model, low, device=device, batch_size=batch, tta=tta)
                seconds[name] += time.perf_counter() - clock
                scores[name] = float(np.mean([metrics.psnr(o, r, window) for o, r in zip(out, case.hu)]))
            rows.append({"case": case.name, "dose": dose, **scores, "gain": scores["tta"] - scores["plain"]})
            print(f"{case.name:24s} dose {dose:<5} plain {scores['plain']:.2f}  tta {scores['tta']:.2f} dB", flush=True)
    interval = metrics.paired_bootstrap_ci([r["tta"] for r in rows], [r["plain"] for r in rows])
    low, high = interval["low"], interval["high"]
    result = {
        "weights": args.weights,
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "window": "-160_240",
        "rows": rows,
        "mean_gain_db": interval["mean"],
        "gain_ci95_db": [float(low), float(high)],
        "time_ratio": seconds["tta"] / seconds["plain"],
    }
    print(
        f"mean gain {result['mean_gain_db']:+.2f} dB [{low:+.2f}, {high:+.2f}] over {len(rows)} (case, dose) pairs; "
        f"{result['time_ratio']:.1f}x the time"
    )
    if args.output:
        write_text(Path(args.output), json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
