"""How a :class:`~dcar.pipeline.DCARPipeline` runs: precision, ``torch.compile`` and the fast paths, as one typed
config section (``inference.*`` of ``scripts/sample.py`` and the evaluation scripts).

None of these options changes the sampling algorithm; each changes rounding (bf16/fp16, compiled kernels, folded
norms, the GELU epilogue), so a resumed evaluation must run with the same ones (:func:`inference_settings`).
``scripts/benchmark.py`` has the same keys at its top level and applies them through the same functions.

    python scripts/sample.py pipeline=runs/pipe prompts="a red circle" inference.dtype=bfloat16 \\
        inference.compile=true inference.compile_mode=reduce-overhead inference.decoder_channels_last=true

Precision (``dtype`` other than float32): ``precision=autocast`` keeps float32 weights and runs every call under
``torch.autocast(device, dtype)`` (:meth:`DCARPipeline.set_autocast`; HART samples in fp16 this way);
``precision=cast`` casts the tokenizer and the generator to ``dtype`` (and, in bf16 with ``cast_text_encoder``, the
text encoder: T5 was trained in bf16, its activations overflow fp16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .config.schema import choice

__all__ = ["COMPILE_MODES", "DTYPES", "InferenceConfig", "compile_pipeline", "configure_pipeline",
           "inference_settings"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class InferenceConfig:
    """Precision, compilation and fast paths of a sampling pipeline (the module docstring)."""

    dtype: str = choice("float32", *DTYPES)
    # autocast: float32 weights, every call under torch.autocast(dtype); cast: the tokenizer and generator weights
    precision: str = choice("autocast", "autocast", "cast")
    cast_text_encoder: bool = True  # precision=cast, dtype=bfloat16: the text encoder in bf16 too
    compile: bool = False  # torch.compile the generator's forward (DCARPipeline.compile; static shapes)
    compile_mode: str = choice("default", *COMPILE_MODES)  # reduce-overhead / max-autotune: CUDA graphs
    compile_backend: str = "inductor"
    compile_head: bool = True  # with compile: the diffusion head's denoising network too
    compile_text: bool = False  # with compile: the text encoder's transformer too
    compile_decoder: bool = False  # with compile: the DC-HT decoder too
    static_text_kv: bool = True  # with a CUDA-graph mode: cross-attention K/V in fixed buffers
    decoder_channels_last: bool = False  # NHWC inference copy of the decoder (DCARPipeline.set_decoder_path)
    decoder_fuse_norms: bool = False  # BatchNorm folded into convs, RMSNorm as F.rms_norm (set_decoder_path)
    gelu_epilogue: bool = False  # CUDA sampling: the MLP's GELU in the fc1 GEMM (DCAR.set_gelu_epilogue)


def configure_pipeline(pipe, cfg: InferenceConfig, *, compile: bool = True):
    """Apply ``cfg`` to ``pipe`` (on its device already) and return it: precision, decoder path, GELU epilogue and,
    with ``cfg.compile`` (and ``compile=True``; the benchmark compiles later, after counting FLOPs),
    :func:`compile_pipeline`. A float32 ``dtype`` leaves the weights and the autocast alone."""
    dtype = DTYPES[cfg.dtype]
    pipe.set_decoder_path(channels_last=cfg.decoder_channels_last, fuse_norms=cfg.decoder_fuse_norms)
    pipe.generator.set_gelu_epilogue(cfg.gelu_epilogue)
    if cfg.precision == "cast" and dtype != torch.float32:
        text_dtype = torch.bfloat16 if cfg.cast_text_encoder and dtype == torch.bfloat16 else None
        pipe.to(dtype=dtype, text_dtype=text_dtype)
        pipe.set_autocast(None)
    else:
        pipe.set_autocast(None if dtype == torch.float32 else dtype)
    if compile and cfg.compile:
        compile_pipeline(pipe, cfg)
    return pipe


def compile_pipeline(pipe, cfg: InferenceConfig):
    """``pipe.compile`` with the ``compile_*`` / ``static_text_kv`` settings of ``cfg``; returns ``pipe``."""
    return pipe.compile(mode=cfg.compile_mode, backend=cfg.compile_backend, head=cfg.compile_head,
                        text=cfg.compile_text, decoder=cfg.compile_decoder, static_text_kv=cfg.static_text_kv)


def inference_settings(cfg: InferenceConfig) -> dict[str, object]:
    """The settings of ``cfg`` that differ from the defaults (plain float32, eager): what an evaluation records
    beside its images, so that a resumed run cannot mix images made differently. Empty for the defaults, so work
    folders of default runs keep the settings they had before this section existed."""
    default = asdict(InferenceConfig())
    return {key: value for key, value in asdict(cfg).items() if value != default[key]}
