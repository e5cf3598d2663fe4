"""The DC-AR transformer body: PixArt-alpha blocks with the adaptive norms removed.

Source: PixArt-alpha ``diffusion/model/nets/PixArt.py`` (``PixArtBlock``, ``MultiHeadCrossAttention``,
``CaptionEmbedder``, ``get_2d_sincos_pos_embed``). Without adaLN-single (no timestep in a token model) a block is
``x += SelfAttn(LN(x)); x += CrossAttn(x, text); x += MLP(LN(x))`` with PixArt's non-affine LayerNorms (eps 1e-6),
a fused QKV projection for self-attention, un-normed and un-gated cross-attention (q Linear(C, C), fused kv
Linear(C, 2C), zero-initialised output projection) and a GELU-tanh MLP. All attention goes through
``scaled_dot_product_attention``; the text mask is a key-padding mask. The 2-D sin-cos position embedding uses
PixArt's base-size interpolation and is recomputed for the actual (h, w) on every forward.

``DCARBlock.gelu_epilogue`` (off by default; ``DCAR.set_gelu_epilogue``) computes the MLP's ``gelu_tanh(fc1(x))``
in one ``torch._addmm_activation`` call when it applies: on CUDA (:data:`TANH_EPILOGUE_DEVICES`) and without
autograd (sampling). There cuBLASLt applies bias and GELU in the GEMM's epilogue, so the (tokens, 4C) activation
is not read and written again by a separate GELU kernel (torch.compile's inductor keeps the op as an extern call;
it splits a plain ``addmm`` + GELU into a GEMM and a pointwise kernel instead).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "TANH_EPILOGUE_DEVICES", "CaptionProjection", "CrossAttention", "DCARBlock", "SelfAttention", "TextKV",
    "linear_gelu_epilogue", "sincos_1d", "sincos_pos_embed_2d",
]

# Device types on which ``torch._addmm_activation(..., use_gelu=True)`` applies the tanh GELU of PixArt's MLP (CUDA:
# cuBLASLt's GELU_BIAS epilogue, or addmm + gelu(approximate="tanh") where cuBLASLt does not apply; see torch's
# ``_addmm_activation`` decomposition). The CPU kernel applies the exact (erf) GELU: a different function there.
TANH_EPILOGUE_DEVICES = frozenset({"cuda"})


def sincos_pos_embed_2d(
    dim: int, h: int, w: int, base_size: int, interpolation_scale: float = 1.0, device: torch.device | None = None
) -> Tensor:
    """PixArt-alpha's 2-D sin-cos embedding (h * w, dim) in row-major (h, w) token order.

    Row ``i`` sits at ``i / (h / base_size) / interpolation_scale`` (columns likewise with ``w``). The first
    ``dim/2`` channels encode the column (w) coordinate and the last ``dim/2`` the row (h); each half is
    ``[sin(pos * omega_k), cos(pos * omega_k)]`` with ``omega_k = 10000^(-k / (dim/4))``, ``k < dim/4``.
    """
    if dim % 4:
        raise ValueError(f"dim={dim} must be a multiple of 4")
    pos_h = torch.arange(h, dtype=torch.float64, device=device) / (h / base_size) / interpolation_scale
    pos_w = torch.arange(w, dtype=torch.float64, device=device) / (w / base_size) / interpolation_scale
    emb_w = sincos_1d(pos_w, dim // 2)[None, :, :].expand(h, w, dim // 2)
    emb_h = sincos_1d(pos_h, dim // 2)[:, None, :].expand(h, w, dim // 2)
    return torch.cat([emb_w, emb_h], dim=-1).reshape(h * w, dim).float()


def sincos_1d(pos: Tensor, dim: int) -> Tensor:
    """Sin-cos features (N, dim) float64 of positions ``pos`` (N,): ``[sin(pos * omega_k), cos(pos * omega_k)]``,
    ``omega_k = 10000^(-k / (dim/2))``, ``k < dim/2`` (the transformer / MAE form)."""
    if dim % 2:
        raise ValueError(f"dim={dim} must be even")
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64, device=pos.device) / (dim / 2))
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def _heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, C) -> (B, H, N, C/H)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    """(B, H, N, D) -> (B, N, H*D)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def linear_gelu_epilogue(x: Tensor, fc: nn.Linear) -> Tensor:
    """``gelu(fc(x))`` for x (..., in) in one ``torch._addmm_activation`` call (tanh GELU on CUDA, erf on CPU: see
    :data:`TANH_EPILOGUE_DEVICES`). The op has no autograd formula (inference only) and no CUDA autocast kernel, so
    under autocast the inputs are cast to the autocast dtype here, as autocast casts ``fc``'s."""
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch._addmm_activation(fc.bias.to(dtype), flat, fc.weight.to(dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], out.shape[-1])


class CaptionProjection(nn.Module):
    """PixArt's ``CaptionEmbedder`` MLP: Linear(caption_dim, C) -> GELU(tanh) -> Linear(C, C)."""

    def __init__(self, caption_dim: int, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(caption_dim, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class SelfAttention(nn.Module):
    """timm-style attention: fused qkv Linear(C, 3C) and proj Linear(C, C), both with bias."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        h = self.num_heads
        out = F.scaled_dot_product_attention(_heads(q, h), _heads(k, h), _heads(v, h))
        return self.proj(_merge(out))


@dataclass
class TextKV:
    """Cross-attention keys/values of every block for one batch of captions (see ``DCAR.encode_text``).

    ``keys[i]`` / ``values[i]``: (B, H, L, C/H) for block ``i``; ``mask``: (B, L) bool key-padding mask (True =
    attend); ``attn_mask``: the (B, 1, 1, L) SDPA mask, ``None`` when no key is padded; ``has_keys``: (B,) bool,
    False for a sample without any valid key (its cross-attention output is zero).
    """

    keys: list[Tensor]
    values: list[Tensor]
    mask: Tensor
    attn_mask: Tensor | None
    has_keys: Tensor

    def tensors(self) -> list[Tensor]:
        """Every tensor, in a fixed order: keys, values, mask, has_keys, then attn_mask when there is one."""
        extra = [] if self.attn_mask is None else [self.attn_mask]
        return [*self.keys, *self.values, self.mask, self.has_keys, *extra]

    def map(self, fn: Callable[[Tensor], Tensor]) -> TextKV:
        """The same structure with ``fn`` applied to every tensor (``attn_mask`` None stays None)."""
        return TextKV([fn(k) for k in self.keys], [fn(v) for v in self.values], fn(self.mask),
                      None if self.attn_mask is None else fn(self.attn_mask), fn(self.has_keys))

    @staticmethod
    def masks(mask: Tensor) -> tuple[Tensor | None, Tensor]:
        """SDPA mask and ``has_keys`` from a (B, L) key-padding mask; fully masked rows attend to all keys. Without
        padding there is no SDPA mask, except under torch.compile, where reading ``mask.all()`` would break the
        graph (the mask then lets every key through: the same attention)."""
        has_keys = mask.any(dim=1)
        if not torch.compiler.is_compiling() and bool(mask.all()):
            return None, has_keys
        safe = mask | ~has_keys[:, None]  # avoid NaN from an all -inf softmax row; the output is zeroed instead
        return safe[:, None, None, :], has_keys


class CrossAttention(nn.Module):
    """PixArt's ``MultiHeadCrossAttention``: q Linear(C, C), fused kv Linear(C, 2C), proj Linear(C, C) (zero init)."""

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def project_kv(self, text: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, L, C/H) of the projected caption tokens (B, L, C)."""
        k, v = self.kv(text).chunk(2, dim=-1)
        return _heads(k, self.num_heads), _heads(v, self.num_heads)

    def forward(self, x: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, has_keys: Tensor) -> Tensor:
        q = _heads(self.q(x), self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        if attn_mask is not None:
            out = out * has_keys[:, None, None, None].to(out.dtype)
        return self.proj(_merge(out))


class DCARBlock(nn.Module):
    """``x += SA(LN(x)); x += CA(x, text); x += MLP(LN(x))`` (PixArtBlock without adaLN-single).

    ``gelu_epilogue`` (default False): the MLP's first Linear and GELU in one :func:`linear_gelu_epilogue` call
    where that computes the same function (a device in :data:`TANH_EPILOGUE_DEVICES`) and autograd is off; else
    (training, CPU) the plain ``F.gelu(fc1(x), approximate="tanh")``.
    """

    def __init__(self, width: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, num_heads)
        self.cross_attn = CrossAttention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.gelu_epilogue = False

    def mlp(self, x: Tensor) -> Tensor:
        """``fc2(gelu_tanh(fc1(LN(x))))``."""
        h = self.norm2(x)
        if self.gelu_epilogue and x.device.type in TANH_EPILOGUE_DEVICES and not torch.is_grad_enabled():
            return self.fc2(linear_gelu_epilogue(h, self.fc1))
        return self.fc2(F.gelu(self.fc1(h), approximate="tanh"))

    def forward(self, x: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, has_keys: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        x = x + self.cross_attn(x, k, v, attn_mask, has_keys)
        return x + self.mlp(x)
