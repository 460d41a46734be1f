"""Exponential moving average of a model's trainable weights, the copy that is validated and exported."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEMA:
    """``shadow ← d·shadow + (1 − d)·weights`` after every optimizer step, for the trainable parameters.

    The effective decay ramps up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early weights
    (far from the optimum) are forgotten quickly. Frozen parameters and buffers are copied as they are.
    ``decay = 0`` makes the average the weights themselves.

    Args:
        model: the trained model (not wrapped in DDP).
        decay: the decay per step once warmed up (0.999 averages over about 1,000 steps).
    """

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)
        self._names = [name for name, p in model.named_parameters() if p.requires_grad]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        params = dict(model.named_parameters())
        shadow = dict(self.model.named_parameters())
        targets = [shadow[name] for name in self._names]
        sources = [params[name].detach() for name in self._names]
        if targets:
            torch._foreach_lerp_(targets, sources, 1.0 - decay)
        for (_name, buffer), (_, source) in zip(self.model.named_buffers(), model.named_buffers()):
            buffer.copy_(source)
        self.updates += 1

    def state_dict(self) -> dict:
        params = dict(self.model.named_parameters())
        return {
            "updates": self.updates,
            "decay": self.decay,
            "weights": {name: params[name].detach().clone() for name in self._names},
        }

    def load_state_dict(self, state: dict) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in state["weights"].items():
                params[name].copy_(value)
        self.updates = int(state["updates"])
