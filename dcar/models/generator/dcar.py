"""``DCAR``: the DC-AR generator (a PixArt-alpha transformer without adaLN over discrete tokens + a diffusion head).

Inputs are DC-HT token ids (B, h, w) with ``codebook_size`` marking [MASK] (a learned 16385-entry table, MaskGIT),
captions are per-token text-encoder states with a key-padding mask (PixArt-alpha's cross-attention + caption MLP),
outputs are ``codebook_size``-way logits from an untied Linear after a final non-affine LayerNorm, and the
final-normed hidden states. The diffusion head (MAR's SimpleMLPAdaLN, ``.head``) samples the continuous residual
token at a position conditioned, as in HART, on ``hidden + token_embed(code)`` (``head.condition="hidden+code"``):
the ground-truth code during training, the sampled code at inference. With ``head.loss_tokens="masked"`` (default,
MAR) the diffusion loss covers the [MASK]ed positions only, so at inference a token's residual should be sampled
from the hidden state of the step in which its code was decided (when it was still [MASK]); with ``"all"`` a final
forward over the complete code map gives the hidden states for every residual.

Classifier-free guidance: ``drop_text`` swaps a sample's caption for PixArt's null caption, a fixed random buffer
(``max_text_len``, ``caption_dim``) ~ N(0, 1/caption_dim) drawn from a generator seeded by ``null_caption_seed``
and saved in the state dict; its first L rows are used with an all-valid mask, so the unconditional branch does not
depend on the prompt. Cross-attention keys/values can be computed once per generation (``encode_text``) and passed
as ``text_kv`` to every step; ``return_logits=False`` plus ``to_logits(hidden[still_masked])`` restricts the
codebook projection to the positions that still need it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..hub import HubMixin
from .config import DCARConfig
from .diffusion_head import DiffusionHead
from .masking import random_mask, sample_mask_ratio
from .transformer import CaptionProjection, DCARBlock, TextKV, sincos_pos_embed_2d

__all__ = ["DCAR", "GeneratorOutput"]


class GeneratorOutput(NamedTuple):
    """``logits`` (B, h*w, codebook_size) or None with ``return_logits=False``; ``hidden`` (B, h*w, width)."""

    logits: Tensor | None
    hidden: Tensor


class DCAR(nn.Module, HubMixin):
    """The DC-AR transformer and diffusion head (see the module docstring). Build as ``DCAR(DCARConfig(...))``.

    ``init_weights=False`` skips the random init (e.g. before loading weights); on the meta device it is skipped
    anyway, and ``model.to_empty(device=...)`` followed by ``reset_parameters()`` initialises later.
    """

    config_class = DCARConfig

    def __init__(self, config: DCARConfig, *, init_weights: bool = True) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        self.token_embed = nn.Embedding(c.codebook_size + 1, c.width)
        self.caption_proj = CaptionProjection(c.caption_dim, c.width)
        self.register_buffer("null_caption", torch.empty(c.max_text_len, c.caption_dim), persistent=True)
        self.blocks = nn.ModuleList(DCARBlock(c.width, c.num_heads, c.mlp_ratio) for _ in range(c.num_layers))
        self.final_norm = nn.LayerNorm(c.width, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(c.width, c.codebook_size)
        self.head = DiffusionHead(c.head, c.width) if c.use_head else None
        if init_weights:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PixArt-alpha init (xavier Linear, N(0, 0.02) caption MLP, zero cross-attn proj), N(0, 1) token table,
        the seeded null caption, MAR's head init. A no-op on the meta device."""
        if self.token_embed.weight.is_meta:
            return
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear) and not name.startswith("head."):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.token_embed.weight, std=1.0)
        nn.init.normal_(self.caption_proj.fc1.weight, std=0.02)
        nn.init.normal_(self.caption_proj.fc2.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.cross_attn.proj.weight)
            nn.init.zeros_(block.cross_attn.proj.bias)
        gen = torch.Generator(device="cpu").manual_seed(self.config.null_caption_seed)
        null = torch.randn(tuple(self.null_caption.shape), generator=gen, device="cpu") / self.config.caption_dim**0.5
        self.null_caption.copy_(null)
        if self.head is not None:
            self.head.net.reset_parameters()

    @property
    def mask_token_id(self) -> int:
        """Id of the [MASK] token (= ``codebook_size``)."""
        return self.config.codebook_size

    def num_parameters(self, part: str = "transformer") -> int:
        """Parameter count of ``"transformer"`` (everything but the head), ``"head"`` or ``"all"``."""
        head = sum(p.numel() for p in self.head.parameters()) if self.head is not None else 0
        total = sum(p.numel() for p in self.parameters())
        return {"transformer": total - head, "head": head, "all": total}[part]

    def set_gelu_epilogue(self, enabled: bool = True) -> DCAR:
        """Every block's MLP with (``enabled``) or without cuBLASLt's GELU epilogue when sampling on CUDA
        (:class:`~dcar.models.generator.transformer.DCARBlock`; training and CPU use the plain GELU either way).
        A compiled forward recompiles for the new setting."""
        for block in self.blocks:
            block.gelu_epilogue = bool(enabled)
        return self

    @property
    def gelu_epilogue(self) -> bool:
        """Whether :meth:`set_gelu_epilogue` is on (for every block)."""
        return all(block.gelu_epilogue for block in self.blocks)

    def pos_embed(self, h: int, w: int, device: torch.device | None = None) -> Tensor:
        """The (h*w, width) sin-cos position embedding of an h x w token grid (PixArt base-size interpolation)."""
        c = self.config
        return sincos_pos_embed_2d(c.width, h, w, c.pos_base_size, c.pos_interpolation_scale, device=device)

    def encode_text(self, text_states: Tensor, text_mask: Tensor | None = None, drop_text: Tensor | None = None) -> TextKV:
        """Caption MLP + every block's cross-attention K/V, reusable across generation steps.

        ``text_states`` (B, L, caption_dim), ``text_mask`` (B, L) bool (True = real token; None = all valid),
        ``drop_text`` (B,) bool: samples whose caption is replaced by the null caption (CFG).
        """
        b, length, _ = text_states.shape
        mask = torch.ones(b, length, dtype=torch.bool, device=text_states.device) if text_mask is None else text_mask
        mask = mask.bool()
        if drop_text is not None:
            if length > self.config.max_text_len:
                raise ValueError(f"text length {length} exceeds max_text_len={self.config.max_text_len}")
            drop = drop_text.bool().to(text_states.device)
            null = self.null_caption[:length].to(text_states.dtype)
            text_states = torch.where(drop[:, None, None], null[None], text_states)
            mask = mask | drop[:, None]
        y = self.caption_proj(text_states)
        attn_mask, has_keys = TextKV.masks(mask)
        kv = [block.cross_attn.project_kv(y) for block in self.blocks]
        return TextKV([k for k, _ in kv], [v for _, v in kv], mask, attn_mask, has_keys)

    def forward(
        self,
        tokens: Tensor,
        text_states: Tensor | None = None,
        text_mask: Tensor | None = None,
        drop_text: Tensor | None = None,
        *,
        text_kv: TextKV | None = None,
        return_logits: bool = True,
    ) -> GeneratorOutput:
        """Logits and hidden states for token ids (B, h, w) (``mask_token_id`` at masked positions).

        Pass either the caption (``text_states``, ``text_mask``, optional ``drop_text``) or a precomputed
        ``text_kv = encode_text(...)`` (identical results).
        """
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be (B, h, w), got shape {tuple(tokens.shape)}")
        b, h, w = tokens.shape
        if text_kv is None:
            if text_states is None:
                raise ValueError("pass text_states (and text_mask) or a precomputed text_kv")
            text_kv = self.encode_text(text_states, text_mask, drop_text)
        elif drop_text is not None:
            raise ValueError("drop_text is applied in encode_text; it cannot be combined with text_kv")
        if text_kv.mask.shape[0] != b:
            raise ValueError(f"text batch {text_kv.mask.shape[0]} does not match token batch {b}")
        x = self.token_embed(tokens.reshape(b, h * w))
        x = x + self.pos_embed(h, w, device=x.device).to(x.dtype)
        for block, k, v in zip(self.blocks, text_kv.keys, text_kv.values, strict=True):
            x = block(x, k, v, text_kv.attn_mask, text_kv.has_keys)
        hidden = self.final_norm(x)
        return GeneratorOutput(self.out(hidden) if return_logits else None, hidden)

    def to_logits(self, hidden: Tensor) -> Tensor:
        """Codebook logits of (any subset of) final hidden states (..., width) -> (..., codebook_size)."""
        return self.out(hidden)

    def random_mask(self, tokens: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Training input: (tokens with [MASK] at the masked positions, bool mask (B, h, w)) using the configured
        ratio distribution (``train_mask_ratio``)."""
        b = tokens.shape[0]
        c = self.config
        ratios = sample_mask_ratio(b, c.train_mask_ratio, c.train_mask_ratio_min, generator, tokens.device)
        mask = random_mask(ratios, tokens[0].numel(), generator).reshape(tokens.shape)
        return tokens.masked_fill(mask, self.mask_token_id), mask

    # ---- diffusion head ------------------------------------------------------------------------------------------

    def _require_head(self) -> DiffusionHead:
        if self.head is None:
            raise RuntimeError("this DCAR is discrete-only (use_head=false): it has no diffusion head")
        return self.head

    def head_condition(self, hidden: Tensor, codes: Tensor) -> Tensor:
        """Head condition (..., width): ``hidden + token_embed(codes)`` (HART) or ``hidden`` (``condition``)."""
        if self._require_head().config.condition == "hidden":
            return hidden
        return hidden + self.token_embed(codes.reshape(hidden.shape[:-1]))

    @staticmethod
    def _flat_residuals(residual: Tensor, b: int, n: int) -> Tensor:
        if residual.dim() == 4:  # (B, D, h, w) as DC-HT's ``encode(...).residual``
            residual = residual.flatten(2).transpose(1, 2)
        return residual.reshape(b, n, -1)

    def head_loss(
        self,
        hidden: Tensor,
        code_tokens: Tensor,
        residual_targets: Tensor,
        weight_mask: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Diffusion loss (MSE(eps) + VLB, ``diffusion_batch_mul`` draws) of the residual tokens.

        ``hidden`` (B, N, width) from ``forward``; ``code_tokens`` (B, h, w) ground-truth codes; ``residual_targets``
        (B, D, h, w) or (B, N, D); ``weight_mask`` (B, h, w) or (B, N) bool/float, the [MASK]ed positions: the
        loss is their weighted mean with ``loss_tokens="masked"``, and ignored (every token) with ``"all"``.
        """
        head = self._require_head()
        b, n, c = hidden.shape
        cond = self.head_condition(hidden, code_tokens).reshape(b * n, c)
        target = self._flat_residuals(residual_targets, b, n).reshape(b * n, -1) / head.config.residual_scale
        if head.config.loss_tokens == "all" or weight_mask is None:
            return head.loss(target.to(cond.dtype), cond, None, generator)
        weight = weight_mask.reshape(b * n).to(torch.float32)
        keep = weight > 0
        if not bool(keep.any()):
            return hidden.sum() * 0.0
        return head.loss(target[keep].to(cond.dtype), cond[keep], weight[keep], generator)

    @torch.no_grad()
    def sample_residuals(
        self,
        hidden: Tensor,
        codes: Tensor,
        generator: torch.Generator | None = None,
        num_steps: int | None = None,
        guidance_scale: float = 1.0,
        temperature: float = 1.0,
        uncond_hidden: Tensor | None = None,
    ) -> Tensor:
        """Sample residual tokens (..., D) for hidden states (..., width) and their codes (...).

        CFG (MAR form ``eps_u + s (eps_c - eps_u)``, same noise for both branches) uses ``uncond_hidden`` (the
        hidden states of the null-caption branch, same shape as ``hidden``); the codes are shared. Samples are
        multiplied by ``residual_scale``. Deterministic given ``generator``.
        """
        head = self._require_head()
        lead, c = hidden.shape[:-1], hidden.shape[-1]
        cond = self.head_condition(hidden, codes).reshape(-1, c)
        uncond = None if uncond_hidden is None else self.head_condition(uncond_hidden, codes).reshape(-1, c)
        x = head.sample(cond, generator, num_steps, guidance_scale, temperature, uncond)
        return (x * head.config.residual_scale).reshape(*lead, head.config.token_dim)
