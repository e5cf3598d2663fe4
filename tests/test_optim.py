"""Optimizer construction (dcar.train.optim): AdamW groups, the LR schedule and the fused kernel option."""

import math

import torch
from torch import nn

from dcar.config.schema import OptimConfig
from dcar.train.optim import build_optimizer, lr_factor


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 4))


def _train(fused: bool, steps: int = 20) -> tuple[nn.Module, torch.optim.AdamW]:
    model = _model()
    opt = build_optimizer([model], OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused))
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(32, 8, generator=gen)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def test_groups_decay_only_matrices():
    opt = build_optimizer([_model()], OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.ndim == 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert no_decay["weight_decay"] == 0.0 and all(p.ndim == 1 for p in no_decay["params"])


def test_fused_adamw_is_the_same_update():
    """optim.fused=true uses torch's fused kernel; 20 steps end within float rounding of the default kernel, and far
    from the start (so the comparison is not vacuous)."""
    plain, plain_opt = _train(fused=False)
    fused, fused_opt = _train(fused=True)
    assert fused_opt.param_groups[0]["fused"] is True and not plain_opt.param_groups[0]["fused"]
    start = _model()
    for a, b, s in zip(plain.parameters(), fused.parameters(), start.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
        assert (a - s).abs().max() > 1e-2


def test_cosine_schedule_warms_up_and_ends_at_min_ratio():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    assert lr_factor(0, 100, cfg) == 0.1 and lr_factor(9, 100, cfg) == 1.0
    assert math.isclose(lr_factor(100, 100, cfg), 0.1) and math.isclose(lr_factor(55, 100, cfg), 0.55)
