"""Benchmark of the training data pipeline alone: batches per second of a training config, with and without its
scanner-appearance augmentation (zoom, soften), so a slow recipe is caught before it spends GPU time.

Run with ``langmamba bench batches --config langmamba/configs/langmamba.yaml --set data.root=out/prep/training.npz``.
Each batch is what one training step gets (fresh simulated noise for ``optim.batch_size`` patches); the model is
not run. The first ``--warmup`` batches of each variant are not timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence

from langmamba.runtime import resolve_device, synchronize


def run(
    config_path: str,
    overrides: Sequence[str] = (),
    batches: int = 10,
    warmup: int = 2,
    device: str = "auto",
) -> dict:
    """Seconds per batch of the config as given and of the same config without zoom and softening."""
    from langmamba.train.config import load_config
    from langmamba.train.data import TrainingData

    config = load_config(config_path, list(overrides))
    target = resolve_device(device)
    # Validation slices are simulated once at build time; one slice at one dose keeps that out of the way.
    data_config = dataclasses.replace(config.data, validation_doses=[config.data.validation_doses[0]])
    variants = {
        "as configured": data_config,
        "without zoom and softening": dataclasses.replace(data_config, zoom=None, soften_probability=0.0),
    }
    batch_size = config.optim.batch_size
    result: dict = {"device": str(target), "batch_size": batch_size, "patch_size": data_config.patch_size}
    for name, variant in variants.items():
        data = TrainingData.build(variant, target, config.run.seed, validation_slices=1)
        for _ in range(warmup):
            data.batch(batch_size)
        synchronize(target)
        start = time.perf_counter()
        for _ in range(batches):
            data.batch(batch_size)
        synchronize(target)
        seconds = (time.perf_counter() - start) / batches
        result[name] = {"seconds_per_batch": seconds, "patches_per_second": batch_size / seconds}
    result["slowdown"] = (
        result["as configured"]["seconds_per_batch"] / result["without zoom and softening"]["seconds_per_batch"]
    )
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: prints the :func:`run` result as JSON."""
    parser = argparse.ArgumentParser(prog="langmamba bench batches", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a training config YAML (langmamba/configs/*.yaml)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override"
    )
    parser.add_argument("--batches", type=int, default=10, help="timed batches per variant (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches first (default 2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    args = parser.parse_args(argv)
    print(json.dumps(run(args.config, args.overrides, args.batches, args.warmup, args.device), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
