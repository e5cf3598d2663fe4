"""Exponential moving average of model weights (DiT / MAR style: a frozen copy updated after each optimizer step)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """Holds ``shadow``, a frozen copy of ``model``; ``update`` blends it towards the live weights.

    Floating-point parameters and buffers are averaged; integer buffers (BatchNorm's ``num_batches_tracked``) are
    copied. The shadow is saved in checkpoints like any module, so a resumed run continues the same average.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.shadow = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        live = model.state_dict()
        for key, value in self.shadow.state_dict().items():
            src = live[key].detach()
            if value.is_floating_point():
                value.lerp_(src.to(value.dtype), 1.0 - self.decay)
            else:
                value.copy_(src)

    def forward(self, *args, **kwargs):  # noqa: D401 - the EMA model is used like the model itself
        return self.shadow(*args, **kwargs)
