"""DC-HT: the deep-compression hybrid tokenizer of DC-AR (a DC-AE with a VQ codebook on its latent).

Architecture: the encoder and decoder *are* diffusers' DC-AE modules (``diffusers.models.autoencoders.
autoencoder_dc.Encoder`` / ``Decoder``, built with the same arguments ``AutoencoderDC`` passes), so with the
default config DC-HT's continuous path is exactly DC-AE-f32c32 (efficientvit ``dc_ae_f32c32``) and its
``encoder.*`` / ``decoder.*`` state-dict keys are the diffusers ones. The hybrid part follows HART's hybrid
tokenizer (``hart/modules/models/autoencoder/quantize/hart_hybrid_quantize.py``): the continuous latent ``z`` is
quantised to ``zq`` (discrete tokens) and the residual ``z - zq`` carries what the tokens miss; one shared decoder
decodes ``zq`` (discrete path) or ``zq + residual = z`` (continuous path). Unlike HART there is no quant_conv /
post_quant_conv: DC-AE's latent is quantised directly (DC-AE has ``use_quant_conv=False``) [inference].

BatchNorm: the DC-AE decoder has BatchNorm in its ResBlock stages (efficientvit ``bn2d``, kept as
``nn.BatchNorm2d``). ``DCHT.train()`` follows PyTorch's convention, except that a part (encoder, quantizer,
decoder) whose parameters are all frozen stays in eval mode. So in DC-HT stage 3 (``set_trainable(encoder=False,
quantizer=False, decoder=True)``, HART's ``freeze_codebook_for_hybrid``) the decoder's BN uses and updates batch
statistics while it trains, and a frozen decoder (or ``model.eval()``) uses the running statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from diffusers.models.autoencoders.autoencoder_dc import Decoder, Encoder
from torch import Tensor, nn

from ..hub import HubMixin
from .config import DCHTConfig
from .quantizer import VectorQuantizer

if TYPE_CHECKING:
    import os


@dataclass
class TokenizerOutput:
    """Result of :meth:`DCHT.encode`.

    ``z``: continuous latent (B, C, H/f, W/f); ``zq``: quantised latent with straight-through gradient to ``z``;
    ``indices``: token ids (B, H/f, W/f) long; ``residual``: ``z - zq`` (no gradient to ``z`` by construction, so
    ``zq + residual`` has an identity gradient to ``z``); ``vq_loss``: scalar VQ loss; ``stats``: detached usage
    statistics of the batch.
    """

    z: Tensor
    zq: Tensor
    indices: Tensor
    residual: Tensor
    vq_loss: Tensor
    stats: dict[str, Tensor]


class DCHT(nn.Module, HubMixin):
    """DC-HT tokenizer: DC-AE encoder/decoder (diffusers modules) plus a VQ codebook (see the module docstring).

    Images are (B, 3, H, W) in [-1, 1] with H, W multiples of ``config.spatial_compression`` (32); any such size
    works (e.g. a model trained at 256 px tokenises 512 px into 16 x 16 tokens).
    """

    config_class = DCHTConfig

    def __init__(self, config: DCHTConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        c = config
        # the arguments diffusers' AutoencoderDC.__init__ passes to Encoder / Decoder
        self.encoder = Encoder(
            in_channels=c.in_channels,
            latent_channels=c.latent_channels,
            attention_head_dim=c.attention_head_dim,
            block_type=c.encoder_block_types,
            block_out_channels=c.encoder_block_out_channels,
            layers_per_block=c.encoder_layers_per_block,
            qkv_multiscales=c.encoder_qkv_multiscales,
            downsample_block_type=c.downsample_block_type,
            out_shortcut=c.encoder_out_shortcut,
        )
        self.decoder = Decoder(
            in_channels=c.in_channels,
            latent_channels=c.latent_channels,
            attention_head_dim=c.attention_head_dim,
            block_type=c.decoder_block_types,
            block_out_channels=c.decoder_block_out_channels,
            layers_per_block=c.decoder_layers_per_block,
            qkv_multiscales=c.decoder_qkv_multiscales,
            norm_type=c.decoder_norm_types,
            act_fn=c.decoder_act_fns,
            upsample_block_type=c.upsample_block_type,
            in_shortcut=c.decoder_in_shortcut,
            conv_act_fn=c.decoder_conv_act_fn,
        )
        self.quantizer = VectorQuantizer(c.quantizer)

    @property
    def spatial_compression(self) -> int:
        """Pixels per latent position along each axis (32)."""
        return self.config.spatial_compression

    # ---------------------------------------------------------------- training-mode handling
    def train(self, mode: bool = True) -> DCHT:
        """``nn.Module.train``, but a part whose parameters are all frozen stays in eval mode (BN running stats)."""
        super().train(mode)
        if mode:
            for part in (self.encoder, self.quantizer, self.decoder):
                params = list(part.parameters())
                if params and not any(p.requires_grad for p in params):
                    part.eval()
        return self

    def set_trainable(self, encoder: bool = True, quantizer: bool = True, decoder: bool = True) -> DCHT:
        """Set ``requires_grad`` per part and re-apply the train/eval rule (stage 3: ``(False, False, True)``)."""
        for part, flag in ((self.encoder, encoder), (self.quantizer, quantizer), (self.decoder, decoder)):
            part.requires_grad_(flag)
        return self.train(self.training)

    # ---------------------------------------------------------------- hybrid tokenizer interface
    def encode(self, images: Tensor) -> TokenizerOutput:
        """Encode images in [-1, 1] to the continuous latent, its tokens and the residual."""
        f = self.spatial_compression
        if images.ndim != 4 or images.shape[-2] % f or images.shape[-1] % f:
            raise ValueError(f"expected (B, C, H, W) images with H, W multiples of {f}, got {tuple(images.shape)}")
        z = self.encoder(images)
        q = self.quantizer(z)
        return TokenizerOutput(z=z, zq=q.zq, indices=q.indices, residual=z - q.zq, vq_loss=q.loss, stats=q.stats)

    def decode(self, latent: Tensor, decoder: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Decode a latent map (``z``, ``zq`` or ``zq + residual``) to images (roughly in [-1, 1], not clamped).

        ``decoder``: another module to run instead of ``self.decoder`` (e.g. an inference copy from
        :func:`~dcar.models.tokenizer.fast_decoder.build_inference_decoder`)."""
        return (self.decoder if decoder is None else decoder)(latent)

    def indices_to_latent(self, indices: Tensor) -> Tensor:
        """Codebook vectors of token ids (B, h, w) as a latent map (B, C, h, w)."""
        return self.quantizer.lookup(indices)

    def decode_indices(self, indices: Tensor, residual: Tensor | None = None,
                       decoder: Callable[[Tensor], Tensor] | None = None) -> Tensor:
        """Decode token ids (B, h, w), adding the continuous ``residual`` (B, C, h, w) to the codes if given
        (``decoder``: as in :meth:`decode`)."""
        latent = self.indices_to_latent(indices)
        if residual is not None:
            latent = latent + residual.to(latent.dtype)
        return self.decode(latent, decoder)

    def forward(
        self, images: Tensor, path: Literal["continuous", "discrete"] = "continuous"
    ) -> tuple[Tensor, TokenizerOutput]:
        """Reconstruct ``images`` through the continuous (``decode(z)``) or discrete (``decode(zq)``) path."""
        if path not in ("continuous", "discrete"):
            raise ValueError(f"path must be 'continuous' or 'discrete', got {path!r}")
        out = self.encode(images)
        return self.decode(out.z if path == "continuous" else out.zq), out

    # ---------------------------------------------------------------- weights
    def load_dcae_weights(self, path_or_hub_id: str | os.PathLike, **kwargs) -> DCHT:
        """Load a DC-AE checkpoint (efficientvit or diffusers keys) into encoder/decoder; see ``dcae_weights``."""
        from .dcae_weights import load_dcae_weights

        load_dcae_weights(self, path_or_hub_id, **kwargs)
        return self

    def last_layer_weight(self) -> Tensor:
        """Weight of the decoder's final conv (for VQGAN's adaptive GAN-loss weight)."""
        last = self.decoder.conv_out
        return (last.conv if hasattr(last, "conv") else last).weight

    def num_parameters(self, part: Literal["encoder", "decoder", "quantizer", "all"] = "all") -> int:
        """Parameter count of one part or of the whole model (works on the meta device)."""
        module = self if part == "all" else getattr(self, part)
        return sum(p.numel() for p in module.parameters())
