"""DC-HT, DC-AR's deep-compression hybrid tokenizer: DC-AE-f32c32 encoder/decoder plus a VQ codebook."""

from .build import build_tokenizer, load_tokenizer_config
from .config import DCHTConfig, QuantizerConfig
from .dcae_weights import load_dcae_weights, native_to_diffusers, to_native_state_dict
from .dcht import DCHT, TokenizerOutput
from .fast_decoder import DecoderPath, InferenceDecoder, build_inference_decoder
from .quantizer import QuantizerOutput, VectorQuantizer

__all__ = [
    "DCHT",
    "DCHTConfig",
    "DecoderPath",
    "InferenceDecoder",
    "QuantizerConfig",
    "QuantizerOutput",
    "TokenizerOutput",
    "VectorQuantizer",
    "build_inference_decoder",
    "build_tokenizer",
    "load_dcae_weights",
    "load_tokenizer_config",
    "native_to_diffusers",
    "to_native_state_dict",
]
