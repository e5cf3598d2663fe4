"""Configuration dataclasses of the DC-HT tokenizer (``DCHTConfig``) and its vector quantiser (``QuantizerConfig``).

The DC-AE fields mirror the constructor of diffusers' ``AutoencoderDC`` one to one (``to_diffusers_kwargs``), and
their defaults are the paper's DC-AE-f32c32 (efficientvit ``dc_ae_f32c32``, configs ``dc-ae-f32c32-{in,mix}-1.0``).
Note that ``qkv_multiscales`` defaults to ``((),) * 6``: diffusers' class default ``(5,)`` belongs to the SANA
variant and is wrong for f32c32-in/mix. Fields are ints, floats, strings and (nested) tuples only, so a config
round-trips through JSON and OmegaConf (lists read back from either are turned into tuples again).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RES, EVIT = "ResBlock", "EfficientViTBlock"


def _as_tuple(value: Any) -> Any:
    """Lists (from JSON/OmegaConf) become tuples, recursively; other values are returned unchanged."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value


@dataclass
class QuantizerConfig:
    """Single-scale VQ of the DC-HT latent (HART's codebook: ``nn.Embedding``, plain L2 lookup, learned by gradient).

    ``dim`` must equal the tokenizer's ``latent_channels``. ``init`` is ``"normal"`` (N(0, init_scale^2), the
    ``nn.Embedding`` default for scale 1) or ``"uniform"`` (U(-init_scale/V, init_scale/V), VAR/HART's ``eini < 0``).
    ``chunk_size`` is how many tokens share one (chunk x codebook_size) distance matrix.
    Dead-code restart (off by default; HART has none): in training mode, a code that no token of the (global) batch
    has picked for ``dead_code_steps`` consecutive steps is re-initialised from a random latent vector of the current
    batch. ``usage_ema_decay`` > 0 keeps a running EMA of code frequencies (a statistic only, like HART's
    ``ema_vocab_hit_SV``).
    """

    codebook_size: int = 16384
    dim: int = 32
    beta: float = 0.25
    init: str = "normal"
    init_scale: float = 1.0
    chunk_size: int = 4096
    usage_ema_decay: float = 0.99
    dead_code_restart: bool = False
    dead_code_steps: int = 100


@dataclass
class DCHTConfig:
    """DC-HT = DC-AE encoder/decoder (diffusers ``AutoencoderDC`` fields) plus a VQ codebook on the 32-ch latent.

    Defaults: DC-AE-f32c32 (encoder 123,172,384 and decoder 200,184,076 parameters). The spatial compression is
    ``2 ** (len(block_out_channels) - 1)``; every stage after the first needs at least one layer (diffusers puts the
    stage's down/upsampler inside the stage, so an empty stage would drop a 2x resampling).
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: tuple[str, ...] = (RES, RES, RES, EVIT, EVIT, EVIT)
    decoder_block_types: tuple[str, ...] = (RES, RES, RES, EVIT, EVIT, EVIT)
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (0, 4, 8, 2, 2, 2)
    decoder_layers_per_block: tuple[int, ...] = (0, 5, 10, 2, 2, 2)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (), (), ())
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (), (), ())
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: tuple[str, ...] = ("batch_norm",) * 3 + ("rms_norm",) * 3
    decoder_act_fns: tuple[str, ...] = ("relu",) * 3 + ("silu",) * 3
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if name != "quantizer":
                setattr(self, name, _as_tuple(getattr(self, name)))
        if isinstance(self.quantizer, dict):
            self.quantizer = QuantizerConfig(**self.quantizer)

    def validate(self) -> None:
        """Raise ``ValueError`` for combinations the DC-AE blocks cannot build (called by ``DCHT.__init__``)."""
        for side in ("encoder", "decoder"):
            widths = getattr(self, f"{side}_block_out_channels")
            per_stage = {
                "block_types": getattr(self, f"{side}_block_types"),
                "layers_per_block": getattr(self, f"{side}_layers_per_block"),
                "qkv_multiscales": getattr(self, f"{side}_qkv_multiscales"),
            }
            if side == "decoder":
                per_stage.update(norm_types=self.decoder_norm_types, act_fns=self.decoder_act_fns)
            for key, values in per_stage.items():
                if len(values) != len(widths):
                    raise ValueError(f"{side}_{key} has {len(values)} entries, block_out_channels has {len(widths)}")
            layers = per_stage["layers_per_block"]
            if any(n < 1 for n in layers[1:]):
                raise ValueError(f"{side}_layers_per_block={layers}: every stage after the first needs >= 1 layer")
            if widths[-1] % self.latent_channels:
                raise ValueError(f"{side} width {widths[-1]} is not a multiple of latent_channels")
            for width, kind in zip(widths, per_stage["block_types"], strict=True):
                if kind not in (RES, EVIT):
                    raise ValueError(f"unknown block type {kind!r}; use {RES!r} or {EVIT!r}")
                if kind == EVIT and width % self.attention_head_dim:
                    raise ValueError(f"EfficientViT width {width} is not a multiple of {self.attention_head_dim}")
        for norm in self.decoder_norm_types:
            if norm not in ("batch_norm", "rms_norm", "layer_norm"):
                raise ValueError(f"unknown decoder norm type {norm!r}")
        q = self.quantizer
        if q.dim != self.latent_channels:
            raise ValueError(f"quantizer.dim={q.dim} must equal latent_channels={self.latent_channels}")
        if q.init not in ("normal", "uniform"):
            raise ValueError(f"quantizer.init={q.init!r}; use 'normal' or 'uniform'")
        if q.codebook_size < 1 or q.chunk_size < 1 or q.dead_code_steps < 1:
            raise ValueError("quantizer.codebook_size, chunk_size and dead_code_steps must be positive")

    @property
    def spatial_compression(self) -> int:
        """Downsampling factor from pixels to latent (32 for f32c32)."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    def to_diffusers_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``diffusers.AutoencoderDC`` that build the same encoder/decoder."""
        return {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "quantizer"}
