"""Optimizer and LR schedule construction shared by the trainers."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from dcar.config.schema import OptimConfig

NO_DECAY_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.modules.batchnorm._BatchNorm)  # + every 1-D param


def param_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases, norms and embeddings (as MaskGIT / 1d-tokenizer do)."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, p in sub.named_parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                (no_decay if isinstance(sub, NO_DECAY_TYPES) or name == "bias" or p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(modules: Iterable[nn.Module], cfg: OptimConfig, lr_mult: float = 1.0) -> torch.optim.AdamW:
    groups = param_groups(modules, cfg.weight_decay)
    if not groups:
        raise ValueError("no trainable parameters to optimise")
    return torch.optim.AdamW(groups, lr=cfg.lr * lr_mult, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True if cfg.fused else None)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warm-up over ``warmup_steps``, then constant or cosine decay to ``min_lr_ratio``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, cfg))
