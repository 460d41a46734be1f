"""Where a run executes: the torch device, the default weights, the slices per batch and the torchrun ranks.

Every front-end (the ``langmamba`` command line, the folder runner, the benchmarks, the MONAI Label app and the
simulator) resolves these here, so ``"auto"`` means the same device everywhere and one environment variable
(``LANGMAMBA_WEIGHTS``) moves the weights for all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    import torch

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "langmamba"


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``"auto"`` (or ``None``) → CUDA when available, else CPU; anything else as given."""
    import torch

    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from exc


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a CUDA device; nothing to wait for on the CPU), so a clock read
    after it times the work and not its queueing."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_weights() -> Path:
    """``$LANGMAMBA_WEIGHTS`` or the repository's shipped ``weights/langmamba``."""
    path = Path(os.environ.get("LANGMAMBA_WEIGHTS", DEFAULT_WEIGHTS))
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no LangMamba weights at {path}; pass --weights or set LANGMAMBA_WEIGHTS")
    return path


def default_batch_size(device: torch.device | str = "auto") -> int:
    """Slices per batch when none is given: 4 on CUDA; 1 on the CPU, where it was both the fastest and the
    leanest (512² slices, shipped weights: 0.72 s/slice and +0.36 GB against 0.83 s/slice and +1.16 GB at 4)."""
    return 4 if resolve_device(device).type == "cuda" else 1


@dataclass(frozen=True)
class TorchrunRank:
    """This process's place in a ``torchrun`` launch: ``rank`` of ``world_size`` processes, ``local_rank`` on
    its host; ``TorchrunRank()`` is a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> TorchrunRank:
        """From torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a single process without them."""
        try:
            rank = int(os.environ.get("RANK", 0))
            world = int(os.environ.get("WORLD_SIZE", 1))
            local = int(os.environ.get("LOCAL_RANK", rank))
        except ValueError as error:
            raise ConfigError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers: {error}") from error
        if world < 1 or not 0 <= rank < world:
            raise ConfigError(f"RANK {rank} is not within WORLD_SIZE {world}")
        return cls(rank, world, local)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that validates, logs and writes."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: gradients and results have to be shared."""
        return self.world_size > 1

    def device(self, device: str = "auto") -> str:
        """The device of this rank: ``cuda:LOCAL_RANK`` when ``device`` is ``auto`` (with CUDA) or ``cuda``."""
        import torch

        resolved = resolve_device(device)
        if self.world_size > 1 and resolved.type == "cuda" and resolved.index is None:
            if self.local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK {self.local_rank} but only {torch.cuda.device_count()} CUDA device(s)")
            return f"cuda:{self.local_rank}"
        return str(resolved)

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0 (``None`` on the others), through a gloo process group
        that torchrun's environment describes; ``[value]`` for a single process or without that environment."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_available() or "MASTER_ADDR" not in os.environ:
            return [value]
        # The slowest rank may finish hours after the fastest; the others wait here for it.
        dist.init_process_group("gloo", timeout=timedelta(days=7))
        try:
            parts: list[Any] = [None] * self.world_size
            dist.all_gather_object(parts, value)
            return parts if dist.get_rank() == 0 else None
        finally:
            dist.destroy_process_group()
