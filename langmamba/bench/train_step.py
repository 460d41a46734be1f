"""Benchmark of whole training steps, split into phases, so GPU minutes go to the model and not to overhead.

Run with ``langmamba bench step --config langmamba/configs/langae.yaml --set data.root=out/prep/training.npz``.
Each step is the training loop's own (:func:`langmamba.train.engine.training_step`, bf16 on CUDA): draw a
batch, the task's loss (forward), backward, then clipping, the optimizer and the moving average. The phases are
timed with the device synchronised at their ends; ``--profile N`` also lists the N operators with the most self
time.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

from langmamba.runtime import resolve_device, synchronize

PHASES = ("batch", "forward", "backward", "optimizer")


def run(
    config_path: str,
    overrides: Sequence[str] = (),
    steps: int = 10,
    warmup: int = 3,
    device: str = "auto",
    profile: int = 0,
) -> dict:
    """Seconds per step and per phase of the config's training step, after ``warmup`` untimed steps."""
    import torch

    from langmamba.train.config import load_config
    from langmamba.train.data import TrainingData
    from langmamba.train.ema import ModelEMA
    from langmamba.train.engine import build_optimizer, seed_everything, step_autocast, training_step
    from langmamba.train.tasks import build_task

    config = load_config(config_path, list(overrides))
    target = resolve_device(device)
    seed_everything(config.run.seed)
    data = TrainingData.build(config.data, target, config.run.seed, validation_slices=0)
    task = build_task(config, data, target)
    model = task.model.to(target)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], config)
    ema = ModelEMA(model, config.optim.ema_decay)
    autocast = step_autocast(target, config)
    totals = dict.fromkeys(PHASES, 0.0)

    def step(index: int, timed: bool) -> None:
        if not timed:
            training_step(task, model, model, data, optimizer, ema, config, index, autocast)
            return
        marks = [time.perf_counter()]

        def mark() -> None:
            synchronize(target)
            marks.append(time.perf_counter())

        training_step(task, model, model, data, optimizer, ema, config, index, autocast, mark)
        mark()
        for phase, start, end in zip(PHASES, marks, marks[1:]):
            totals[phase] += end - start

    for index in range(warmup):
        step(index, timed=False)
    synchronize(target)
    for index in range(steps):
        step(warmup + index, timed=True)
    per_phase = {phase: seconds / steps for phase, seconds in totals.items()}
    result: dict = {
        "device": str(target),
        "model": config.model,
        "batch_size": config.optim.batch_size,
        "patch_size": config.data.patch_size,
        "seconds_per_step": sum(per_phase.values()),
        "seconds_per_phase": per_phase,
    }
    if profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if target.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as profiler:
            for index in range(3):
                step(warmup + steps + index, timed=False)
            synchronize(target)
        key = "self_cuda_time_total" if target.type == "cuda" else "self_cpu_time_total"
        result["top_operators"] = profiler.key_averages().table(sort_by=key, row_limit=profile)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: prints the :func:`run` result as JSON (the operator table as plain text after it)."""
    parser = argparse.ArgumentParser(prog="langmamba bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training config (YAML)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="list the N slowest operators")
    args = parser.parse_args(argv)
    result = run(args.config, args.set, args.steps, args.warmup, args.device, args.profile)
    table = result.pop("top_operators", None)
    print(json.dumps(result, indent=2))
    if table:
        print(table)
    return 0
