"""The DC-AR generator: a PixArt-alpha transformer without adaLN over DC-HT tokens, a MAR diffusion head for the
residual tokens, MaskGIT masking utilities and frozen text encoders."""

from .build import build_generator, build_text_encoder, load_generator_config, load_text_encoder_config
from .config import DCARConfig, HeadConfig, TextEncoderConfig
from .dcar import DCAR, GeneratorOutput
from .diffusion_head import DiffusionHead, SimpleMLPAdaLN
from .masking import (
    choose_tokens_to_mask,
    gumbel_temperature,
    mask_schedule,
    mask_schedule_counts,
    random_mask,
    sample_mask_ratio,
    sampled_log_prob,
)
from .text_encoder import CachedText, TextEncoder, build_word_tokenizer, load_cached
from .transformer import TextKV, sincos_pos_embed_2d

__all__ = [
    "DCAR",
    "CachedText",
    "DCARConfig",
    "DiffusionHead",
    "GeneratorOutput",
    "HeadConfig",
    "SimpleMLPAdaLN",
    "TextEncoder",
    "TextEncoderConfig",
    "TextKV",
    "build_generator",
    "build_text_encoder",
    "build_word_tokenizer",
    "choose_tokens_to_mask",
    "gumbel_temperature",
    "load_cached",
    "load_generator_config",
    "load_text_encoder_config",
    "mask_schedule",
    "mask_schedule_counts",
    "random_mask",
    "sample_mask_ratio",
    "sampled_log_prob",
    "sincos_pos_embed_2d",
]
