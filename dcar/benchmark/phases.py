"""The text-to-image call split into its phases, and the transformer phase with one sampling optimisation off.

:func:`phased_call` runs the pipeline's public pieces in the order of ``DCARPipeline.generate_tokens`` +
``decode`` (same defaults, same random stream, hence the same images as ``pipe(prompts, ...)``), each inside
``phase(name)``: a context manager that times the phase (:class:`PhaseClock`) or counts its FLOPs
(:class:`PhaseFlops`). Phases:

* ``text``: the frozen text encoder (``encode_prompts``) and the generator's caption MLP + cross-attention K/V of
  both CFG branches, computed once (``DCARPipeline.text_kv``);
* ``transformer``: the MaskGIT steps (``maskgit_decode``; with ``head.loss_tokens="all"`` also the extra forward
  over the complete code map);
* ``head``: the diffusion head sampling every residual token (``sample_residuals``);
* ``decode``: DC-HT decoding of codes + residuals to pixels (``decode``).

:func:`transformer_phase` is the ablation's unit: text K/V + the MaskGIT loop, with ``variant`` switching one
optimisation off through the generator's public API (``encode_text``, ``forward``, ``to_logits``). The normal
sampling path is not touched: a variant either passes an argument that exists (``logits_at_masked_only=False``) or
hands ``maskgit_decode`` a stand-in for the generator whose forward runs another way:

* ``full_logits``: the codebook projection over every position, then gathered (``logits_at_masked_only=False``);
* ``separate_cfg``: the conditional and the null-caption rows as two forwards of B rows, each with its own K/V;
* ``recompute_kv``: the caption MLP and every block's K/V recomputed inside each step (``forward(text_states=...)``);
* ``forward``: any other callable as the generator's forward (eager vs ``torch.compile``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from dcar.models.generator import GeneratorOutput, TextKV
from dcar.pipeline import DCARPipeline
from dcar.sampling import branch_hidden, encode_text_branches, maskgit_decode

from .timing import flop_counter, sync

__all__ = ["PHASES", "VARIANTS", "PhaseClock", "PhaseFlops", "Sampling", "phased_call", "transformer_phase"]

PHASES = ("text", "transformer", "head", "decode")
VARIANTS = ("baseline", "full_logits", "separate_cfg", "recompute_kv", "forward")


@dataclass(frozen=True)
class Sampling:
    """The sampler settings of a benchmarked call (everything else at ``generate_tokens``' defaults)."""

    num_steps: int = 12
    guidance_scale: float = 4.5
    seed: int = 0

    def flags(self, pipe: DCARPipeline) -> tuple[bool, bool, bool, bool]:
        """``(need_head, head_cfg, use_cfg, masked_mode)`` exactly as ``generate_tokens`` derives them."""
        model = pipe.generator
        need_head = model.head is not None
        head_cfg = need_head and self.guidance_scale != 1.0
        use_cfg = self.guidance_scale != 1.0 or head_cfg
        masked = need_head and model.head.config.loss_tokens == "masked"
        return need_head, head_cfg, use_cfg, masked


class PhaseClock:
    """``phase(name)`` context manager: synchronised wall time per phase, summed into ``seconds[name]``."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        sync(self.device)
        start = time.perf_counter()
        yield
        sync(self.device)
        self.seconds[name] += time.perf_counter() - start


class PhaseFlops:
    """``phase(name)`` context manager: FlopCounterMode count per phase, summed into ``flops[name]``."""

    def __init__(self) -> None:
        self.flops: dict[str, int] = defaultdict(int)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        with flop_counter() as counter:
            yield
        self.flops[name] += int(counter.get_total_flops())


@torch.no_grad()
def phased_call(pipe: DCARPipeline, prompts: list[str], s: Sampling,
                phase: Callable[[str], Any]) -> Tensor:
    """``pipe(prompts, s.num_steps, s.guidance_scale, seed=s.seed)`` run piece by piece inside ``phase(name)``;
    returns the same images (B, 3, H, W). The models must be in eval mode."""
    model = pipe.generator
    need_head, head_cfg, use_cfg, masked = s.flags(pipe)
    gen = pipe.make_generator(s.seed)
    with phase("text"):
        states, mask = pipe.encode_prompts(prompts)
        kv = pipe.text_kv(states, mask, use_cfg)
    with phase("transformer"):
        out = maskgit_decode(model, kv, states.shape[0], pipe.grid_size(), use_cfg=use_cfg, num_steps=s.num_steps,
                             guidance_scale=s.guidance_scale, generator=gen, keep_hidden=masked,
                             keep_uncond=masked and head_cfg)
        hidden, uncond = out.hidden, out.uncond_hidden
        if need_head and not masked:
            hidden, uncond, _ = branch_hidden(model, out.codes, kv, use_cfg)
    residual = None
    with phase("head"):
        if need_head:
            b, h, w = out.codes.shape
            res = model.sample_residuals(hidden, out.codes.reshape(b, h * w), gen, None, s.guidance_scale, 1.0,
                                         uncond if head_cfg else None)
            residual = res.transpose(1, 2).reshape(b, -1, h, w)
    with phase("decode"):
        images = pipe.decode(out.codes, residual)
    return images


class _StandIn:
    """Takes the generator's place inside ``maskgit_decode`` (mask id, ``to_logits``) with another forward."""

    def __init__(self, model: Any, forward: Callable[[Tensor, TextKV, bool], GeneratorOutput]) -> None:
        self.model = model
        self.forward = forward

    @property
    def mask_token_id(self) -> int:
        return self.model.mask_token_id

    def to_logits(self, hidden: Tensor) -> Tensor:
        return self.model.to_logits(hidden)

    def __call__(self, tokens: Tensor, *, text_kv: TextKV, return_logits: bool = True) -> GeneratorOutput:
        return self.forward(tokens, text_kv, return_logits)


def _rows_only(mask: Tensor) -> TextKV:
    """A K/V-less ``TextKV`` (``maskgit_decode`` reads only ``.mask``) for stand-ins that build their own."""
    return TextKV([], [], mask, None, mask.any(dim=1))


@torch.no_grad()
def transformer_phase(pipe: DCARPipeline, states: Tensor, mask: Tensor, s: Sampling, variant: str = "baseline",
                      forward: Callable[..., GeneratorOutput] | None = None) -> Tensor:
    """Text K/V + the MaskGIT steps for prompt states (B, L, D) / mask (B, L): the codes (B, h, w).

    ``variant`` is one of :data:`VARIANTS` (see the module docstring); ``"forward"`` needs ``forward``, called as
    ``forward(tokens, text_kv=..., return_logits=...)`` (e.g. a ``torch.compile``-d generator).
    """
    model = pipe.generator
    _, head_cfg, use_cfg, masked = s.flags(pipe)
    b = states.shape[0]
    kwargs = dict(use_cfg=use_cfg, num_steps=s.num_steps, guidance_scale=s.guidance_scale,
                  generator=pipe.make_generator(s.seed), keep_hidden=masked, keep_uncond=masked and head_cfg)
    stand_in: Any = model
    if variant in ("baseline", "full_logits"):
        kv = encode_text_branches(model, states, mask, use_cfg)
        kwargs["logits_at_masked_only"] = variant == "baseline"
    elif variant == "forward":
        if forward is None:
            raise ValueError("variant='forward' needs forward=")
        kv = encode_text_branches(model, states, mask, use_cfg)
        stand_in = _StandIn(model, lambda t, text_kv, rl: forward(t, text_kv=text_kv, return_logits=rl))
    elif variant == "separate_cfg":
        if not use_cfg:
            raise ValueError("separate_cfg needs classifier-free guidance (guidance_scale != 1)")
        kv_c = model.encode_text(states, mask)
        kv_u = model.encode_text(states, mask, drop_text=torch.ones(b, dtype=torch.bool, device=states.device))

        def two_forwards(tokens: Tensor, text_kv: TextKV, return_logits: bool) -> GeneratorOutput:
            cond = model(tokens[:b], text_kv=kv_c, return_logits=return_logits)
            uncond = model(tokens[b:], text_kv=kv_u, return_logits=return_logits)
            logits = None if cond.logits is None else torch.cat([cond.logits, uncond.logits])
            return GeneratorOutput(logits, torch.cat([cond.hidden, uncond.hidden]))

        kv = _rows_only(torch.cat([mask, mask]))
        stand_in = _StandIn(model, two_forwards)
    elif variant == "recompute_kv":
        rows_states = torch.cat([states, states]) if use_cfg else states
        rows_mask = torch.cat([mask, mask]) if use_cfg else mask
        drop = torch.arange(rows_states.shape[0], device=states.device) >= b if use_cfg else None
        kv = _rows_only(rows_mask)
        stand_in = _StandIn(model, lambda t, text_kv, rl: model(t, rows_states, rows_mask, drop, return_logits=rl))
    else:
        raise ValueError(f"unknown variant {variant!r}; use one of {VARIANTS}")
    return maskgit_decode(stand_in, kv, b, pipe.grid_size(), **kwargs).codes
