"""Masking for DC-AR's masked autoregressive generation: pure functions, deterministic given a ``torch.Generator``.

* Training mask ratio: MaskGIT's cosine (``r ~ U[0, 1)``, mask rate ``cos(pi/2 r)`` clipped to [1e-6, 1],
  ``maskgit/libml/mask_schedule.py``) or MAR's truncated normal (loc 1, scale 0.25, truncated to
  [min_ratio, 1]; ``mar/models/mar.py`` uses min 0.7, HART 0.5). One ratio per sample (MAR draws one per batch),
  ``ceil(ratio * N)`` positions masked in a uniformly random order.
* Inference: MaskGIT's cosine schedule of how many tokens are still masked after each step, clamped so that each
  step unmasks at least one token and nothing is masked after the last step (``parallel_decode.py``), and
  ``mask_by_random_topk``: re-mask the lowest ``log p(sampled) + tau * Gumbel`` with
  ``tau = choice_temperature * (1 - (step + 1) / num_steps)``; known tokens carry +inf confidence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "choose_tokens_to_mask",
    "gumbel_temperature",
    "mask_schedule",
    "mask_schedule_counts",
    "random_mask",
    "sample_mask_ratio",
    "sampled_log_prob",
]


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


def sample_mask_ratio(
    batch_size: int,
    kind: str = "cosine",
    min_ratio: float = 0.7,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-sample training mask ratios (B,) in (0, 1]: ``"cosine"`` (MaskGIT) or ``"truncnorm"`` (MAR, >= min_ratio)."""
    u = _rand((batch_size,), generator, device).double()
    if kind == "cosine":
        ratio = torch.cos(0.5 * math.pi * u).clamp(1e-6, 1.0)
    elif kind == "truncnorm":  # inverse-CDF sampling of N(1, 0.25^2) truncated to [min_ratio, 1]
        lo = torch.special.ndtr(torch.tensor((min_ratio - 1.0) / 0.25, dtype=torch.float64))
        hi = 0.5  # ndtr(0): the upper bound is the mean
        ratio = (1.0 + 0.25 * torch.special.ndtri(lo + (hi - lo) * u)).clamp(min_ratio, 1.0)
    else:
        raise ValueError(f"unknown mask ratio kind {kind!r}; use 'cosine' or 'truncnorm'")
    return ratio.float()


def random_mask(ratios: Tensor, num_tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """A bool mask (B, N), True = masked, with ``clamp(ceil(ratio * N), 1, N)`` positions per sample at random."""
    counts = torch.ceil(ratios.double() * num_tokens).long().clamp(1, num_tokens)
    scores = _rand((ratios.shape[0], num_tokens), generator, ratios.device)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return ranks < counts[:, None]


def mask_schedule_counts(num_steps: int, num_tokens: int) -> list[int]:
    """Tokens still masked after each of ``num_steps`` steps (MaskGIT cosine, clamped; the last entry is 0).

    Each step unmasks at least one token whenever ``num_steps <= num_tokens`` (otherwise some steps unmask none).
    Example, 64 tokens and 12 steps: 63, 61, 59, 55, 50, 45, 38, 32, 24, 16, 8, 0.
    """
    if num_steps < 1 or num_tokens < 1:
        raise ValueError("num_steps and num_tokens must be >= 1")
    counts, masked = [], num_tokens
    for step in range(num_steps):
        if step == num_steps - 1:
            masked = 0
        else:
            target = math.floor(num_tokens * math.cos(0.5 * math.pi * (step + 1) / num_steps))
            masked = max(1, min(masked - 1, target))
        counts.append(masked)
    return counts


def mask_schedule(step: int, num_steps: int, num_tokens: int) -> int:
    """Number of tokens still masked after ``step`` (0-based) of ``num_steps`` (see :func:`mask_schedule_counts`)."""
    if not 0 <= step < num_steps:
        raise ValueError(f"step={step} is outside [0, {num_steps})")
    return mask_schedule_counts(num_steps, num_tokens)[step]


def gumbel_temperature(step: int, num_steps: int, choice_temperature: float = 4.5) -> float:
    """MaskGIT's linearly annealed choice temperature ``choice_temperature * (1 - (step + 1) / num_steps)``."""
    return choice_temperature * (1.0 - (step + 1) / num_steps)


def sampled_log_prob(logits: Tensor, tokens: Tensor) -> Tensor:
    """``log softmax(logits)`` at ``tokens``: logits (..., V), tokens (...) long -> (...) float32."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[..., None]).squeeze(-1)


def choose_tokens_to_mask(
    confidence: Tensor,
    num_to_mask: int | Tensor,
    gumbel_temperature: float,
    generator: torch.Generator | None = None,
    known: Tensor | None = None,
) -> Tensor:
    """MaskGIT ``mask_by_random_topk``: True at the ``num_to_mask`` lowest ``confidence + tau * Gumbel`` per row.

    ``confidence`` (B, N) is ``log p(sampled token)``, +inf where the token was already known (or pass ``known``,
    a bool (B, N), to force that); ``num_to_mask`` is an int or a (B,) tensor. Known tokens are never re-masked as
    long as ``num_to_mask`` does not exceed the number of unknown ones.
    """
    conf = confidence.float()
    if known is not None:
        conf = conf.masked_fill(known, math.inf)
    if gumbel_temperature > 0:
        u = _rand(tuple(conf.shape), generator, conf.device)
        gumbel = -torch.log(-torch.log(u + 1e-20) + 1e-20)
        conf = conf + gumbel_temperature * gumbel
    ranks = conf.argsort(dim=1, stable=True).argsort(dim=1)
    if not torch.is_tensor(num_to_mask):
        num_to_mask = torch.full((conf.shape[0],), int(num_to_mask), device=conf.device)
    return ranks < num_to_mask.to(conf.device)[:, None]
