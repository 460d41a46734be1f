"""Training: ``langmamba train langae|seed|redcnn`` (one process or several with torchrun)."""

from __future__ import annotations

from pathlib import Path

from .config import TrainConfig, load_config


def train(config: TrainConfig, progress: bool = True, resume: bool = True) -> Path:
    """Train the model the config names; returns the folder of its final checkpoint."""
    from .engine import run_training
    from .tasks import build_task

    return run_training(config, build_task, progress=progress, resume=resume)


__all__ = ["TrainConfig", "load_config", "train"]
