"""MaskGIT decoding of DC-HT token maps with classifier-free guidance: the pure sampling loop of DC-AR.

Algorithmic choices and where they come from:

* **Parallel decoding** (MaskGIT, Chang et al. 2022, ``maskgit/libml/parallel_decode.py``): start from an all-[MASK]
  map; at each of ``num_steps`` steps sample a code at every still-masked position, keep the most confident ones
  and re-mask the rest. How many stay masked after each step follows MaskGIT's cosine schedule, clamped so that
  every step fixes at least one token and nothing is masked after the last step
  (:func:`dcar.models.generator.masking.mask_schedule_counts`).
* **Confidence** (MaskGIT ``mask_by_random_topk``): ``log p(sampled code) + tau * Gumbel`` with the choice
  temperature annealed linearly, ``tau = choice_temperature * (1 - (step + 1) / num_steps)`` (MaskGIT's
  class-conditional config uses 4.5); tokens fixed earlier carry +inf and are never re-masked.
* **Code sampling**: categorical on ``logits / temperature`` (optionally top-k filtered, as HART's
  ``sample_with_top_k_top_p_``); ``temperature=0`` is greedy.
* **Classifier-free guidance on the logits** in the Muse / MAR form ``uncond + s * (cond - uncond)`` (not HART's
  ``(1 + s) cond - s uncond``, which equals this form with ``s + 1``). ``cfg_schedule="constant"`` uses ``s`` at
  every step; ``"linear"`` is MAR's ``sample_tokens`` schedule (following Muse), ``1 + (s - 1) * (L - m) / L`` with
  ``m`` the number of tokens still masked after the step, rising from about 1 to ``s``. Both branches run in one
  batched forward of 2B rows, the conditional rows first and the null-caption rows (``drop_text``) second, as MAR
  and HART double the batch; the cross-attention K/V of both are computed once (:func:`encode_text_branches`).
* **Logits only where needed**: the transformer runs with ``return_logits=False`` and the codebook projection is
  applied to the hidden states of the still-masked positions only (the projection is the largest single matmul of
  the paper model: 1152 x 16384 per token). The still-masked positions are found without a host synchronisation
  (:func:`unknown_positions`: their count per row is known from the schedule), so on a GPU the CPU queues each
  step while the previous one runs.
* **Hidden states for the residual head** (MAR trains its diffusion loss on the [MASK]ed positions, and so does
  DC-AR's ``head.loss_tokens="masked"``): with ``keep_hidden=True`` the loop stores, for every position, the final
  hidden state (conditional and, with CFG, unconditional) of the step in which its code was decided, i.e. while
  the position was still [MASK] in the input. The head later samples all residuals in one batched call.

Everything is deterministic given a ``torch.Generator``; no global RNG is touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from .models.generator import DCAR, TextKV
from .models.generator.masking import choose_tokens_to_mask, gumbel_temperature, mask_schedule_counts

__all__ = [
    "CFG_SCHEDULES",
    "DecodeOutput",
    "branch_hidden",
    "cfg_scale",
    "encode_text_branches",
    "guide",
    "maskgit_decode",
    "sample_logits",
    "unknown_positions",
]

CFG_SCHEDULES = ("constant", "linear")


class DecodeOutput(NamedTuple):
    """Result of :func:`maskgit_decode`.

    ``codes`` (B, h, w) long; ``hidden`` / ``uncond_hidden`` (B, h*w, width) or None: per position, the conditional
    / unconditional final hidden state of the step in which its code was fixed (``keep_hidden``, ``keep_uncond``).
    """

    codes: Tensor
    hidden: Tensor | None
    uncond_hidden: Tensor | None


def cfg_scale(guidance_scale: float, schedule: str, num_tokens: int, num_masked_after: int) -> float:
    """The guidance scale of one step: ``"constant"`` or MAR's ``"linear"`` ``1 + (s-1) (L - m) / L``."""
    if schedule == "constant":
        return float(guidance_scale)
    if schedule == "linear":
        return 1.0 + (guidance_scale - 1.0) * (num_tokens - num_masked_after) / num_tokens
    raise ValueError(f"unknown cfg_schedule {schedule!r}; use one of {CFG_SCHEDULES}")


def guide(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Muse/MAR guidance ``uncond + scale * (cond - uncond)``; exactly ``cond`` when ``scale == 1``."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def sample_logits(
    logits: Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Sample ids from ``logits`` (..., V) at ``temperature`` (0 = argmax), optionally top-k filtered.

    Returns ``(ids (...) long, log_prob (...) float32)``, the log-probability of each sampled id under the
    distribution it was drawn from (MaskGIT's confidence).
    """
    logits = logits.float()
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if temperature <= 0:
        ids = logits.argmax(dim=-1)
        return ids, torch.log_softmax(logits, dim=-1).gather(-1, ids[..., None]).squeeze(-1)
    log_probs = torch.log_softmax(logits / temperature, dim=-1)
    flat = log_probs.reshape(-1, log_probs.shape[-1]).exp()
    dev = generator.device if generator is not None else flat.device
    ids = torch.multinomial(flat.to(dev), 1, generator=generator).to(flat.device).view(log_probs.shape[:-1])
    return ids, log_probs.gather(-1, ids[..., None]).squeeze(-1)


def encode_text_branches(
    model: DCAR, text_states: Tensor, text_mask: Tensor | None, use_cfg: bool
) -> TextKV:
    """Cross-attention K/V for a generation: B caption rows, plus (``use_cfg``) B null-caption rows after them."""
    b = text_states.shape[0]
    if not use_cfg:
        return model.encode_text(text_states, text_mask)
    mask = torch.ones(text_states.shape[:2], dtype=torch.bool, device=text_states.device) if text_mask is None \
        else text_mask
    drop = torch.arange(2 * b, device=text_states.device) >= b
    return model.encode_text(torch.cat([text_states, text_states]), torch.cat([mask, mask]), drop_text=drop)


def branch_hidden(
    model: DCAR, tokens: Tensor, text_kv: TextKV, use_cfg: bool, return_logits: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """One (batched) forward of token maps (B, h, w): ``(cond_hidden, uncond_hidden or None, logits or None)``.

    With ``use_cfg`` the map is duplicated to 2B rows for the K/V of :func:`encode_text_branches`; ``logits``
    then has 2B rows (conditional first).
    """
    b = tokens.shape[0]
    inp = torch.cat([tokens, tokens]) if use_cfg else tokens
    out = model(inp, text_kv=text_kv, return_logits=return_logits)
    hidden = out.hidden
    return hidden[:b], (hidden[b:] if use_cfg else None), out.logits


def unknown_positions(unknown: Tensor, count: int) -> Tensor:
    """The positions (B, count) of the True entries of ``unknown`` (B, N), ascending, when every row has exactly
    ``count`` of them (the decoding schedule is shared by the rows): ``unknown.nonzero()[:, 1].view(B, count)``
    without its host synchronisation (nonzero's output size depends on the data, so the CPU waits for the GPU at
    every step and cannot queue the next step's kernels while the current ones run). A stable sort of the
    known flags puts the unknown positions first, in order."""
    return torch.sort(unknown.logical_not().to(torch.uint8), dim=1, stable=True).indices[:, :count]


def maskgit_decode(
    model: DCAR,
    text_kv: TextKV,
    batch_size: int,
    grid: tuple[int, int],
    *,
    use_cfg: bool,
    num_steps: int = 12,
    guidance_scale: float = 1.0,
    cfg_schedule: str = "linear",
    temperature: float = 1.0,
    choice_temperature: float = 4.5,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    keep_hidden: bool = False,
    keep_uncond: bool = False,
    logits_at_masked_only: bool = True,
    on_step: Callable[[int, Tensor], None] | None = None,
) -> DecodeOutput:
    """Decode ``batch_size`` token maps of size ``grid`` = (h, w) with MaskGIT + CFG (see the module docstring).

    ``text_kv`` comes from :func:`encode_text_branches` with the same ``use_cfg``. ``guidance_scale`` is ignored
    without ``use_cfg``. ``logits_at_masked_only=False`` computes the full logits (the plain path, for checks).
    ``on_step(step, tokens)`` is called after every step with the (B, h, w) map ([MASK] = ``model.mask_token_id``).
    """
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"unknown cfg_schedule {cfg_schedule!r}; use one of {CFG_SCHEDULES}")
    if num_steps < 1:
        raise ValueError("num_steps must be >= 1")
    b, (h, w) = batch_size, grid
    n = h * w
    device = text_kv.mask.device
    mask_id = model.mask_token_id
    tokens = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    unknown = torch.ones(b, n, dtype=torch.bool, device=device)
    hidden_store = uncond_store = None
    counts = mask_schedule_counts(num_steps, n)
    masked_before = n
    for step, masked_after in enumerate(counts):
        cond_h, uncond_h, logits = branch_hidden(
            model, tokens.view(b, h, w), text_kv, use_cfg, return_logits=not logits_at_masked_only
        )
        idx = unknown_positions(unknown, masked_before)
        rows = 2 * b if use_cfg else b
        idx_rows = torch.cat([idx, idx]) if use_cfg else idx
        if logits_at_masked_only:
            hid = cond_h if uncond_h is None else torch.cat([cond_h, uncond_h])
            sel = hid.gather(1, idx_rows[..., None].expand(rows, idx.shape[1], hid.shape[-1]))
            logits = model.to_logits(sel)
        else:
            logits = logits.gather(1, idx_rows[..., None].expand(rows, idx.shape[1], logits.shape[-1]))
        if use_cfg:
            scale = cfg_scale(guidance_scale, cfg_schedule, n, masked_after)
            logits = guide(logits[:b], logits[b:], scale)
        ids, log_prob = sample_logits(logits, temperature, top_k, generator)
        sampled = tokens.scatter(1, idx, ids)
        confidence = torch.full((b, n), math.inf, device=device).scatter(1, idx, log_prob)
        tau = gumbel_temperature(step, num_steps, choice_temperature)
        remask = choose_tokens_to_mask(confidence, masked_after, tau, generator, known=~unknown)
        newly = unknown & ~remask
        if keep_hidden:
            hidden_store = torch.zeros_like(cond_h) if hidden_store is None else hidden_store
            hidden_store = torch.where(newly[..., None], cond_h, hidden_store)
        if keep_uncond and uncond_h is not None:
            uncond_store = torch.zeros_like(uncond_h) if uncond_store is None else uncond_store
            uncond_store = torch.where(newly[..., None], uncond_h, uncond_store)
        tokens = torch.where(remask, mask_id, sampled)
        unknown, masked_before = remask, masked_after
        if on_step is not None:
            on_step(step, tokens.view(b, h, w))
    return DecodeOutput(tokens.view(b, h, w), hidden_store, uncond_store)
