"""Generator training throughput: ``GeneratorStep`` forward + backward + AdamW step on random inputs.

One step is what ``GeneratorTrainer.train_step`` does after the frozen encoders: random token ids (B, h, w),
residual tokens (B, D, h, w), text states (B, L, caption_dim) with random caption lengths and 10% null captions,
masked-token cross-entropy + the residual diffusion loss, ``backward``, ``AdamW.step`` (dcar's parameter groups,
the paper config's betas / weight decay) and ``zero_grad``. Every step reseeds the global RNG (restored
afterwards), so all steps mask the same positions and cost the same FLOPs. The first step runs under the FLOP
counter (forward + backward; the optimizer's elementwise work is not counted) and doubles as a warm-up.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch

from dcar.config.schema import OptimConfig
from dcar.models.generator import DCAR

from .timing import flop_counter, peak_memory, reset_peak_memory, time_calls

__all__ = ["train_throughput"]


def random_batch(model: DCAR, batch: int, text_len: int, device: torch.device, seed: int) -> tuple:
    """``(indices, residual or None, text_states, text_mask, drop_text)`` for one training step."""
    c = model.config
    h = w = c.grid_size
    dtype = next(model.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    indices = torch.randint(0, c.codebook_size, (batch, h, w), generator=gen, device=device)
    residual = None
    if model.head is not None:
        residual = 0.5 * torch.randn(batch, c.head.token_dim, h, w, generator=gen, device=device, dtype=dtype)
    states = torch.randn(batch, text_len, c.caption_dim, generator=gen, device=device, dtype=dtype)
    lengths = torch.randint(1, text_len + 1, (batch, 1), generator=gen, device=device)
    text_mask = torch.arange(text_len, device=device)[None] < lengths
    drop = torch.rand(batch, generator=gen, device=device) < 0.1
    return indices, residual, states, text_mask, drop


def train_throughput(model: DCAR, batch: int, text_len: int, device: torch.device,
                     amp: Callable[[], AbstractContextManager], warmup: int, repeats: int,
                     seed: int = 0, compile_backend: str | None = None) -> dict[str, Any]:
    """Seconds per step (median of ``repeats`` after ``1 + warmup`` untimed steps), FLOPs per step, peak memory.

    ``compile_backend``: the timed steps run the GeneratorStep compiled with that backend as ``train.compile`` compiles
    it (:func:`~dcar.train.runtime.compile_for_training`; the counted first step stays eager, the warm-up steps
    include the compilation).
    ``model`` is trained in place (its weights change); it is left in eval mode.
    """
    from dcar.train.generator import GeneratorStep
    from dcar.train.optim import build_optimizer
    from dcar.train.runtime import compile_for_training

    step_module = GeneratorStep(model, label_smoothing=0.1, head_loss_weight=1.0).train()
    optimizer = build_optimizer([model], OptimConfig(lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045))
    inputs = random_batch(model, batch, text_len, device, seed)
    timed_module = (step_module if compile_backend is None
                    else compile_for_training(step_module, backend=compile_backend))

    def step(module: torch.nn.Module = timed_module) -> None:
        torch.manual_seed(seed)  # the same mask ratios, masks and noise in every step, so the same FLOPs
        with amp():
            out = module(*inputs)
        out["loss"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    reset_peak_memory(device)
    # the step draws its mask ratios, masks and diffusion noise from the global RNG, which step() reseeds; the
    # caller's RNG state is restored afterwards
    rng_devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=rng_devices):
            with flop_counter() as counter:
                step(step_module)
            flops = int(counter.get_total_flops())
            timing = time_calls(step, device, warmup, repeats)
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    return {"batch": batch, "seconds_per_step": timing, "img_s": batch / timing["median"],
            "flops_per_step": flops, "flops_per_image": flops / batch,
            "achieved_flops_per_s": flops / timing["median"], "peak_memory": peak_memory(device)}
