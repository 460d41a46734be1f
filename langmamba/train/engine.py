"""The training loop shared by every model: devices, DDP, bf16, progress, validation, checkpoints, resume, logs.

Run it in one process, or in several with ``torchrun --nproc_per_node N -m langmamba train ...`` (the same
launcher spans nodes): each rank draws its own patches and noise, DistributedDataParallel averages gradients, and
rank 0 validates, logs and writes checkpoints.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from .. import metrics
from ..checkpoint import load_checkpoint, read_weights, save_checkpoint
from ..errors import CheckpointError, ConfigError
from ..io.atomic import atomic_folder, write_text
from ..normalization import hu_to_model, model_to_hu
from ..runtime import TorchrunRank
from ..simulate.protocol import ScanProtocol
from ..visualize import save_figure
from .config import TrainConfig
from .data import TrainingData
from .ema import ModelEMA

logger = logging.getLogger(__name__)


def init_distributed(device_name: str) -> tuple[TorchrunRank, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment (if any) and pick the device:
    ``cuda:LOCAL_RANK`` for ``auto`` or ``cuda`` when CUDA is available, else the CPU."""
    ranks = TorchrunRank.from_environment()
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    device = torch.device("cuda", ranks.local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if ranks.active and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
    return ranks, device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the legacy global generator that libraries still draw from)
    torch.manual_seed(seed)


class Task(Protocol):
    """What the loop needs from a model type."""

    model: nn.Module  # saved in checkpoints
    metric_name: str

    def loss(
        self, module: nn.Module, low: torch.Tensor, full: torch.Tensor, which: list[int], step: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...

    def predict(self, model: nn.Module, low: torch.Tensor, full: torch.Tensor) -> torch.Tensor: ...


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to 10 % of the peak."""
    peak, warmup, total = config.optim.lr, config.optim.warmup_steps, config.optim.steps
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def build_optimizer(trainable: list[nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters with the run's learning rate and weight decay."""
    return torch.optim.AdamW(trainable, lr=config.optim.lr, weight_decay=config.optim.weight_decay, betas=(0.9, 0.99))


def step_autocast(device: torch.device, config: TrainConfig) -> torch.autocast:
    """bf16 autocast of a training step: on CUDA when ``run.bf16``, off elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda" and config.run.bf16)


def training_step(
    task: Task,
    model: nn.Module,
    module: nn.Module,
    data: TrainingData,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA,
    config: TrainConfig,
    step: int,
    autocast: torch.autocast,
    mark: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One optimisation step: learning rate, batch, loss, backward, clipping, optimizer and moving average.

    ``module`` is ``model`` or its DDP wrapper, which the loss runs through; ``mark`` is called after the batch,
    the forward and the backward pass (the benchmark's phase boundaries)."""
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, config)
    low, full, which = data.batch(config.optim.batch_size)
    if mark:
        mark()
    with autocast:
        loss, parts = task.loss(module, low, full, which, step)
    if mark:
        mark()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if mark:
        mark()
    if config.optim.grad_clip:
        params = (p for group in optimizer.param_groups for p in group["params"])
        torch.nn.utils.clip_grad_norm_(params, config.optim.grad_clip)
    optimizer.step()
    ema.update(model)
    return loss, parts


class CheckpointStore:
    """``<output>/checkpoints/step-NNNNNNN/`` folders (model + training state), written whole then renamed."""

    def __init__(self, output: Path, keep: int = 2) -> None:
        self.root = output / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        done = sorted(p for p in self.root.glob("step-*") if (p / "training_state.pt").is_file())
        return done[-1] if done else None

    def save(self, model: nn.Module, state: dict, step: int) -> Path:
        final = self.root / f"step-{step:07d}"
        with atomic_folder(final) as staging:
            save_checkpoint(model, staging / "model", extra={"step": step})
            torch.save(state, staging / "training_state.pt")
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def validate(task: Task, model: nn.Module, data: TrainingData, device: torch.device) -> dict[str, float]:
    """PSNR/SSIM ([-160, 240] HU window) of ``model`` (through the task) on the whole validation slices, averaged
    over slices and validation doses."""
    was_training = model.training
    model.eval()
    outputs, references = [], []
    with torch.no_grad():
        for s, low in zip(data.validation, data.validation_low):
            low_t = torch.as_tensor(hu_to_model(low), dtype=torch.float32, device=device)[None, None]
            full_t = torch.as_tensor(hu_to_model(s.full), dtype=torch.float32, device=device)[None, None]
            output = task.predict(model, low_t, full_t)
            outputs.append(model_to_hu(output[0, 0].float().cpu().numpy()))
            references.append(s.full[: outputs[-1].shape[0], : outputs[-1].shape[1]])
    model.train(was_training)
    if not outputs:
        return {}
    return {
        "val_psnr": float(np.mean([metrics.psnr(o, r) for o, r in zip(outputs, references)])),
        "val_ssim": float(np.mean([metrics.ssim(o, r) for o, r in zip(outputs, references)])),
    }


def plot_log(log_path: Path, figure_path: Path) -> None:
    """Loss (and validation PSNR) against step, from the CSV log (skipped, with a warning, without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        logger.warning("matplotlib is not installed: no loss plot %s", figure_path)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(csv.DictReader(log_path.open()))
    losses = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]
    vals = [(int(r["step"]), float(r["val_psnr"])) for r in rows if r.get("val_psnr")]
    fig, ax = plt.subplots(figsize=(7, 4))
    if losses:
        ax.semilogy(*zip(*losses), label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    if vals:
        twin = ax.twinx()
        twin.plot(*zip(*vals), "o-", color="tab:red", label="validation PSNR")
        twin.set_ylabel("PSNR [dB], window [-160, 240] HU")
    fig.legend(loc="upper right")
    fig.tight_layout()
    save_figure(fig, figure_path, dpi=100)


def initialise_from(model: nn.Module, folder: Path) -> None:
    """Copy the weights of the model folder ``folder`` into ``model`` by name, cast to each parameter's dtype.

    Every trainable parameter must be there with its shape (else :class:`ConfigError` names the first ones);
    frozen parts missing from the folder (e.g. the LangAE decoder an inference export leaves out) keep the
    values the task built.
    """
    tensors = read_weights(folder)
    state = model.state_dict()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(name for name in trainable if name not in tensors or tensors[name].shape != state[name].shape)
    if missing:
        raise ConfigError(
            f"run.init_from={folder} does not fit this model: {len(missing)} trainable tensors "
            f"missing or of another shape, e.g. {missing[:3]}"
        )
    with torch.no_grad():
        for name, value in state.items():
            if name in tensors and tensors[name].shape == value.shape:
                value.copy_(tensors[name].to(value.dtype))
    logger.info("initialised %d of %d tensors from %s", sum(n in tensors for n in state), len(state), folder)


def run_training(
    config: TrainConfig,
    build_task: Callable[[TrainConfig, TrainingData, torch.device], Task],
    progress: bool = True,
    resume: bool = True,
) -> Path:
    """Train the task's model; returns the folder of the exported model (``<output>/model``).

    The exponential moving average of the weights (``optim.ema_decay``) is what is validated; the best average
    by validation PSNR is kept in ``<output>/best`` and exported as ``<output>/model`` (the last average when
    the run has no validation slices). ``<output>/status.json`` says how far the run is.
    """
    dist, device = init_distributed(config.run.device)
    output = Path(config.run.output)
    seed_everything(config.run.seed)  # identical initial weights on every rank
    data = TrainingData.build(config.data, device, config.run.seed, dist.rank, config.run.validation_slices)
    task = build_task(config, data, device)
    model = task.model.to(device)
    if config.run.init_from and (not resume or CheckpointStore(output).latest() is None):
        initialise_from(model, Path(config.run.init_from))
    trainable = [p for p in model.parameters() if p.requires_grad]
    module = model
    if dist.active:
        module = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    optimizer = build_optimizer(trainable, config)
    ema = ModelEMA(model, config.optim.ema_decay)
    store = CheckpointStore(output)
    best = {"val_psnr": -math.inf, "step": 0}
    start = 0
    latest = store.latest() if resume else None
    log_path = output / "log.csv"
    fields = ["step", "loss", "lr", "seconds", "val_psnr", "val_ssim"]
    if latest is not None:
        start, best = _restore(latest, model, optimizer, ema, data, device)
        logger.info("resumed from %s at step %d", latest, start)
        if dist.is_main:
            _truncate_csv(log_path, fields, start)
    elif dist.is_main:
        if store.root.exists() or log_path.exists():
            raise ConfigError(
                f"{output} already holds a training run; resume it (leave resume on) or choose another run.output"
            )
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    autocast = step_autocast(device, config)
    bar = tqdm(
        range(start, config.optim.steps),
        initial=start,
        total=config.optim.steps,
        desc=f"train {config.model}",
        disable=not (progress and dist.is_main),
        dynamic_ncols=True,
    )
    started, last_parts, done = time.time(), {}, start
    for step in bar:
        loss, parts = training_step(task, model, module, data, optimizer, ema, config, step, autocast)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower optim.lr")
        done = step + 1
        stop = config.run.max_minutes is not None and _out_of_time(started, config.run.max_minutes, dist, device)
        last = stop or done == config.optim.steps
        row = None
        if done % config.run.log_every == 0 or last:
            last_parts = {k: float(v) for k, v in parts.items()}
            bar.set_postfix(loss=f"{loss.item():.4g}")
            row = {
                "step": done,
                "loss": loss.item(),
                "lr": learning_rate(step, config),
                "seconds": round(time.time() - started, 1),
            }
        if dist.is_main and (done % config.run.validate_every == 0 or last):
            scores = validate(task, ema.model, data, device)
            row = (row or {"step": done}) | scores
            if scores:
                bar.write(
                    f"step {done}: validation PSNR {scores['val_psnr']:.2f} dB, SSIM {scores['val_ssim']:.4f}"
                    f" (moving average of the weights)"
                )
                if scores["val_psnr"] > best["val_psnr"]:
                    best = {"val_psnr": scores["val_psnr"], "val_ssim": scores["val_ssim"], "step": done}
                    _save_model(ema.model, output / "best", {"step": done, "validation": scores})
        if dist.is_main and row is not None:
            _append_csv(log_path, fields, row)
        if dist.is_main and (done % config.run.checkpoint_every == 0 or last):
            store.save(model, _state(optimizer, ema, data, done, best), done)
            _write_status(output, config, done, best, finished=done >= config.optim.steps)
        if stop:
            bar.write(f"stopping after {done} steps: run.max_minutes={config.run.max_minutes} reached")
            break
        if dist.active:
            torch.distributed.barrier()
    bar.close()
    final = output / "model"
    if dist.is_main:
        extra = {
            "steps": done,
            "train_config": config.to_dict(),
            "scan_protocol": ScanProtocol().to_dict(),  # the simulator's settings of every training low dose
            "final_losses": last_parts,
            "ema_decay": config.optim.ema_decay,
        }
        if (output / "best").is_dir() and best["step"]:
            chosen = load_checkpoint(output / "best")
            extra |= {"best_step": best["step"], "validation": {k: v for k, v in best.items() if k != "step"}}
        else:
            chosen = ema.model
        _save_model(chosen, final, extra)
        _write_status(output, config, done, best, finished=done >= config.optim.steps)
        if log_path.exists():
            plot_log(log_path, output / "loss.png")
    if dist.active:
        torch.distributed.barrier()
    return final


def _save_model(model: nn.Module, folder: Path, extra: dict) -> None:
    """Write a whole checkpoint folder next to ``folder`` and swap it in."""
    with atomic_folder(folder) as staging:
        save_checkpoint(model, staging, extra=extra)


def _write_status(output: Path, config: TrainConfig, step: int, best: dict, finished: bool) -> None:
    """``status.json``: steps done of the planned total and the best validation so far (read by scripts)."""
    status = {
        "model": config.model,
        "step": step,
        "steps": config.optim.steps,
        "finished": finished,
        "best_step": best.get("step") or None,
        "best_val_psnr": best["val_psnr"] if math.isfinite(best["val_psnr"]) else None,
        "best_val_ssim": best.get("val_ssim"),
    }
    write_text(output / "status.json", json.dumps(status, indent=1))


def _out_of_time(started: float, minutes: float, dist: TorchrunRank, device: torch.device) -> bool:
    """Whether the wall-clock budget is spent; every rank takes rank 0's answer so they stop together."""
    flag = torch.tensor([float(time.time() - started > 60 * minutes)], device=device)
    if dist.active:
        torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _append_csv(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, fields: list[str], last_step: int) -> None:
    """Drop log rows written after the checkpoint a run resumes from (they will be written again)."""
    if not path.exists():
        return
    rows = [r for r in csv.DictReader(path.open()) if int(r["step"]) <= last_step]
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, text.getvalue())


def _state(optimizer: torch.optim.Optimizer, ema: ModelEMA, data: TrainingData, step: int, best: dict) -> dict:
    return {
        "step": step,
        "optimizer": optimizer.state_dict(),
        "ema": ema.state_dict(),
        "best": best,
        "data": data.state(),
        "torch_rng": torch.get_rng_state(),
    }


def _restore(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: ModelEMA,
    data: TrainingData,
    device: torch.device,
) -> tuple[int, dict]:
    state_dict = read_weights(folder / "model")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if unexpected or [k for k in missing if not k.endswith("codebook")]:
        raise CheckpointError(
            f"cannot resume from {folder}: it was written by another architecture "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    state = torch.load(folder / "training_state.pt", map_location=device, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    if "ema" in state:
        ema.load_state_dict(state["ema"])
    else:  # a checkpoint from before the moving average: start it from the weights
        ema.model.load_state_dict(model.state_dict())
    if "data" in state:
        data.restore(state["data"])
    torch.set_rng_state(state["torch_rng"].cpu())
    best = state.get("best", {"val_psnr": -math.inf, "step": 0})
    if state.get("data", {}).get("validation") not in (None, data.validation_fingerprint()):
        # Other validation slices or noise than when the best was scored (code or data changed between calls):
        # the next validation starts the comparison afresh (<output>/best is replaced then).
        logger.warning(
            "the validation set changed since %s; the best score so far (%.2f dB at step %d) is no longer compared",
            folder,
            best["val_psnr"],
            best["step"],
        )
        best = {"val_psnr": -math.inf, "step": 0}
    return int(state["step"]), best
