"""How a :class:`~dcar.pipeline.DCARPipeline` executes: autocast, the decoder path, ``torch.compile`` / CUDA graphs
and the static cross-attention K/V buffers those graphs read.

``DCARPipeline`` (:mod:`dcar.pipeline`) decides what is sampled; this base class decides how fast it runs. None of
its settings changes the sampling algorithm (:mod:`dcar.inference` sets them all from one config section).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from .models.generator import TextKV
from .models.tokenizer import DecoderPath, build_inference_decoder
from .models.tokenizer.fast_decoder import weights_key

__all__ = ["CUDA_GRAPH_MODES", "PipelineRuntime"]

_P = TypeVar("_P", bound="PipelineRuntime")

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that capture CUDA graphs


def _static_buffer(t: Tensor) -> Tensor:
    """An uninitialised tensor like ``t`` whose address torch.compile / CUDA graphs treat as fixed."""
    buffer = torch.empty_like(t)
    torch._dynamo.mark_static_address(buffer)
    return buffer


class PipelineRuntime:
    """Execution settings of a pipeline with ``tokenizer``, ``generator``, ``text_encoder`` and ``device``
    (:class:`~dcar.pipeline.DCARPipeline`). Every setter returns the pipeline."""

    def _init_runtime(self) -> None:
        self._decoder_path = DecoderPath()
        self._decoder_compile: dict[str, Any] | None = None  # torch.compile kwargs for the decoder (compile())
        self._decoder_cache: tuple[Any, Callable[[Tensor], Tensor]] | None = None  # (weights key, module)
        self._static_text_kv = False  # compile(): copy each generation's K/V into fixed buffers (CUDA graphs)
        self._text_kv_buffers: dict[tuple, TextKV] = {}  # one set per shape / dtype / device (text_kv)
        self._autocast_dtype: torch.dtype | None = None  # set_autocast()

    def _reset_runtime_caches(self) -> None:
        """After the weights moved (``to``): the decoder copy is rebuilt, the K/V buffers made again."""
        self._decoder_cache = None
        self._text_kv_buffers = {}

    def set_autocast(self: _P, dtype: torch.dtype | None) -> _P:
        """Run :meth:`generate_tokens`, :meth:`refine_residuals` and :meth:`decode` (so every ``pipe(...)`` call)
        under ``torch.autocast(device, dtype)``: bf16 / fp16 matmuls and convolutions over the weights as they are
        (HART samples in fp16 this way); None or float32: off (the default)."""
        if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast dtype must be bfloat16, float16, float32 or None, got {dtype}")
        self._autocast_dtype = None if dtype == torch.float32 else dtype
        return self

    def autocast(self) -> contextlib.AbstractContextManager:
        """The :meth:`set_autocast` context on the pipeline's device (a no-op when off)."""
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._autocast_dtype)

    def _static_text_kv_copy(self, kv: TextKV) -> TextKV:
        """``kv`` as is, or (after :meth:`compile` with a CUDA-graph mode and ``static_text_kv``) copied into the
        fixed buffers kept for its shape (see ``DCARPipeline.text_kv``)."""
        if not self._static_text_kv:
            return kv
        tensors = kv.tensors()  # 2 * blocks + 2 tensors, + 1 with an attn_mask: the key tells the layouts apart
        key = tuple((t.shape, t.stride(), t.dtype, t.device) for t in tensors)
        if key not in self._text_kv_buffers:
            self._text_kv_buffers[key] = kv.map(_static_buffer)
        static = self._text_kv_buffers[key]
        torch._foreach_copy_(static.tensors(), tensors)
        return static

    @property
    def decoder_path(self) -> DecoderPath:
        """The options :meth:`decode` runs the DC-HT decoder with (:meth:`set_decoder_path`)."""
        return self._decoder_path

    def set_decoder_path(self: _P, *, channels_last: bool = False, fuse_norms: bool = False) -> _P:
        """Decode through an inference copy of the DC-HT decoder (:mod:`dcar.models.tokenizer.fast_decoder`):
        ``channels_last`` (NHWC weights and latent), ``fuse_norms`` (BatchNorm folded into the conv / linear it
        follows, RMSNorm as ``F.rms_norm``); both off (default): the tokenizer's own decoder. The copy (a second
        set of decoder weights) is built on the next :meth:`decode` and rebuilt when the tokenizer's decoder
        weights change (``.to()``, ``load_state_dict``, optimizer steps); the tokenizer is never modified. fp32
        images equal the plain path's within rounding (max abs diff <= 1e-5 in the tests)."""
        self._decoder_path = DecoderPath(channels_last=channels_last, fuse_norms=fuse_norms)
        self._decoder_cache = None
        return self

    def compile(self: _P, mode: str | None = None, backend: str = "inductor", *, dynamic: bool = False,
                decoder: bool = False, head: bool = True, text: bool = False,
                static_text_kv: bool = True) -> _P:
        """``torch.compile`` the generator's forward in place (``nn.Module.compile``), with ``head=True`` (default)
        the diffusion head's denoising network the same way (its residual sampler calls it once per denoising
        step on a fixed (2)N x D batch; the scheduler's update stays eager), with ``text=True`` the text encoder's
        transformer (its tokenizer stays eager; a new batch size compiles again), and with ``decoder=True`` the
        decoder that :meth:`decode` runs. ``mode``: ``"default"``, ``"reduce-overhead"`` (CUDA graphs on a
        GPU), ``"max-autotune"``, ...; ``backend``: ``"inductor"`` or ``"eager"`` / ``"aot_eager"`` (no codegen).
        Shapes are static within a generation: every step feeds the whole 2B x h x w token map, and with
        ``logits_at_masked_only`` the per-step gather of still-masked positions and their logits (``to_logits``)
        run outside the compiled forward. ``dynamic=False``: a new batch or grid size compiles again.
        ``static_text_kv`` (with a CUDA-graph mode, ``"reduce-overhead"`` or ``"max-autotune"``): the K/V of
        :meth:`text_kv` live in fixed buffers (one set per batch size, kept until :meth:`to`)."""
        self.generator.compile(mode=mode, backend=backend, dynamic=dynamic)
        self._static_text_kv = static_text_kv and mode in CUDA_GRAPH_MODES
        self._text_kv_buffers = {}
        if head and self.generator.head is not None:
            self.generator.head.net.compile(mode=mode, backend=backend, dynamic=dynamic)
        if text:
            self.text_encoder.model.compile(mode=mode, backend=backend, dynamic=dynamic)
        if decoder:
            self._decoder_compile = {"mode": mode, "backend": backend, "dynamic": dynamic}
            self._decoder_cache = None
        return self

    def _decoder(self) -> Callable[[Tensor], Tensor] | None:
        """The module :meth:`decode` runs: None (the tokenizer's decoder), its compiled wrapper, or the inference
        copy (compiled with :meth:`compile`'s settings when ``decoder=True``)."""
        path, compile_kwargs = self._decoder_path, self._decoder_compile
        if path.plain and compile_kwargs is None:
            return None
        key = id(self.tokenizer.decoder) if path.plain else weights_key(self.tokenizer.decoder)
        if self._decoder_cache is None or self._decoder_cache[0] != key:
            self._decoder_cache = None  # free the old copy before building the new one
            module: Callable[[Tensor], Tensor] = self.tokenizer.decoder if path.plain else \
                build_inference_decoder(self.tokenizer.decoder, path)
            if compile_kwargs is not None:
                module = torch.compile(module, **compile_kwargs)
            self._decoder_cache = (key, module)
        return self._decoder_cache[1]
