"""``DCARPipeline``: text-to-image sampling with DC-AR (DC-HT tokenizer + DC-AR generator + frozen text encoder).

One generation (DC-AR, ICCV 2025, following HART's hybrid inference):

1. the prompts are encoded once by the frozen text encoder, and the generator's cross-attention K/V of the
   caption rows and of the null-caption rows (classifier-free guidance) are computed once (``encode_text``);
2. MaskGIT decoding of the discrete DC-HT tokens with CFG on the logits (:mod:`dcar.sampling`: cosine schedule,
   Gumbel-perturbed confidence with annealed choice temperature, Muse/MAR guidance with a constant or MAR-linear
   schedule, both branches in one batched forward);
3. the diffusion head (MAR's MLP, HART's ``hidden + embed(code)`` condition) samples the continuous residual token
   of every position with CFG in MAR's form on eps. With ``head.loss_tokens="masked"`` (the head was trained, as in
   MAR, on the hidden states of [MASK]ed positions) each residual is conditioned on the hidden state of the step in
   which its code was decided, while it was still [MASK]; with ``"all"`` one extra forward over the complete code
   map gives the hidden states (HART predicts residuals from the final-stage hidden states);
4. DC-HT decodes ``codebook[codes] + residual`` to pixels (HART's ``f_hat += tokens``; ``set_decoder_path``: an
   NHWC / fused-norm inference copy of the decoder; ``compile``: torch.compile / CUDA graphs).

The default guidance scale (4.5, with MAR's linear schedule) is our choice: DC-AR's sampler settings are not
released; HART samples with 4.5 in its own form, which is 5.5 here. A pipeline folder (``save_pretrained``) holds
``tokenizer/`` and ``generator/`` (``HubMixin`` folders: JSON config + safetensors) and ``text_encoder/`` (the
``TextEncoderConfig`` as ``dcar_text_encoder.json``, the Hugging Face tokenizer files and the encoder weights from
``transformers``' ``save_pretrained(safe_serialization=True)``). Loading never unpickles and never uses
``trust_remote_code``.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from . import __version__
from .models.generator import DCAR, TextEncoder, TextKV
from .models.generator.masking import mask_schedule_counts
from .models.generator.text_encoder_folder import load_text_encoder, save_text_encoder
from .models.tokenizer import DCHT
from .pipeline_runtime import CUDA_GRAPH_MODES, PipelineRuntime
from .sampling import branch_hidden, encode_text_branches, maskgit_decode
from .utils.atomic import atomic_write_text
from .utils.modes import eval_mode

__all__ = ["CUDA_GRAPH_MODES", "DEFAULT_GUIDANCE_SCALE", "DCARPipeline", "load_text_encoder", "save_text_encoder"]

DEFAULT_GUIDANCE_SCALE = 4.5


class DCARPipeline(PipelineRuntime):
    """Text-to-image sampling with a DC-HT ``tokenizer``, a DC-AR ``generator`` and a frozen ``text_encoder``.

    ``pipe(prompts, num_steps=12, guidance_scale=4.5, seed=0)`` returns images (B, 3, H, W) in [-1, 1]
    (``output_type="pil"``: PIL images). ``generate_tokens`` and ``refine_residuals`` expose the two halves for
    evaluation. The same ``seed`` (and batch) gives the same images; sampling never touches the global RNG.
    How it runs (autocast, decoder path, ``compile``) comes from :class:`~dcar.pipeline_runtime.PipelineRuntime`.
    """

    def __init__(self, tokenizer: DCHT, generator: DCAR, text_encoder: TextEncoder) -> None:
        gcfg = generator.config
        if text_encoder.hidden_size != gcfg.caption_dim:
            raise ValueError(f"text encoder width {text_encoder.hidden_size} != generator caption_dim {gcfg.caption_dim}")
        if text_encoder.config.max_length > gcfg.max_text_len:
            raise ValueError(f"text encoder max_length {text_encoder.config.max_length} exceeds the generator's "
                             f"max_text_len {gcfg.max_text_len} (the null caption is that long)")
        if tokenizer.config.quantizer.codebook_size != gcfg.codebook_size:
            raise ValueError(f"tokenizer codebook {tokenizer.config.quantizer.codebook_size} != generator "
                             f"codebook_size {gcfg.codebook_size}")
        if tokenizer.spatial_compression != gcfg.downsample:
            raise ValueError(f"tokenizer compression {tokenizer.spatial_compression} != generator downsample "
                             f"{gcfg.downsample}")
        if generator.head is not None and generator.head.config.token_dim != tokenizer.config.latent_channels:
            raise ValueError(f"head token_dim {generator.head.config.token_dim} != tokenizer latent_channels "
                             f"{tokenizer.config.latent_channels}")
        self.tokenizer = tokenizer
        self.generator = generator
        self.text_encoder = text_encoder
        self._init_runtime()

    def __repr__(self) -> str:
        g, t, text = self.generator.config, self.tokenizer.config, self.text_encoder.config
        head = (f"head {g.head.width} x {g.head.depth} ({self.generator.num_parameters('head') / 1e6:.1f}M)"
                if self.generator.head is not None else "no head (discrete only)")
        grid = g.image_size // g.downsample
        amp = "" if self._autocast_dtype is None else f", autocast {str(self._autocast_dtype).removeprefix('torch.')}"
        return (f"DCARPipeline(generator: {g.num_layers} x {g.width}, {g.num_heads} heads "
                f"({self.generator.num_parameters('transformer') / 1e6:.1f}M), {head}; "
                f"tokenizer: DC-HT f{t.spatial_compression}c{t.latent_channels}, {t.quantizer.codebook_size} codes "
                f"({self.tokenizer.num_parameters() / 1e6:.1f}M); text: {text.kind} {text.name_or_path!r}, "
                f"{text.max_length} tokens; {g.image_size} px = {grid}x{grid} tokens; {self.device}, "
                f"{str(self.dtype).removeprefix('torch.')}{amp})")

    # ---- devices and files -------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """The generator's device."""
        return next(self.generator.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The generator's parameter dtype."""
        return next(self.generator.parameters()).dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None, *,
           text_dtype: torch.dtype | None = None) -> DCARPipeline:
        """Move all three models to ``device``; ``dtype`` applies to the tokenizer and the generator, ``text_dtype``
        to the text encoder (None: unchanged; T5 is safe in bfloat16, its activations overflow float16)."""
        self.tokenizer.to(device=device, dtype=dtype)
        self.generator.to(device=device, dtype=dtype)
        self.text_encoder.to(device=device, dtype=text_dtype)
        self._reset_runtime_caches()
        return self

    def save_pretrained(self, save_directory: str | os.PathLike) -> Path:
        """Write ``tokenizer/``, ``generator/``, ``text_encoder/`` and ``pipeline.json`` into ``save_directory``."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(out / "tokenizer")
        self.generator.save_pretrained(out / "generator")
        save_text_encoder(self.text_encoder, out / "text_encoder")
        meta = {"_class": type(self).__name__, "dcar_version": __version__,
                "components": {"tokenizer": "DCHT", "generator": "DCAR", "text_encoder": "TextEncoder"}}
        atomic_write_text(out / "pipeline.json", json.dumps(meta, indent=2))
        return out

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> DCARPipeline:
        """Load a :meth:`save_pretrained` folder (models in eval mode on ``device``)."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a pipeline folder (tokenizer/, generator/, text_encoder/)")
        tokenizer = DCHT.from_pretrained(folder / "tokenizer").eval()
        generator = DCAR.from_pretrained(folder / "generator").eval()
        text_encoder = load_text_encoder(folder / "text_encoder")
        return cls(tokenizer, generator, text_encoder).to(device)

    # ---- pieces ------------------------------------------------------------------------------------------------

    def encode_prompts(self, prompts: str | Sequence[str]) -> tuple[Tensor, Tensor]:
        """Text states (B, L, D) in the generator's dtype and the bool mask (B, L), on the generator's device.
        Under a float16 :meth:`set_autocast` the text encoder runs without it (T5's activations overflow fp16)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompts given")
        dev = self.device.type
        fp16 = torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) == torch.float16
        with torch.autocast(dev, enabled=False) if fp16 else contextlib.nullcontext():
            states, mask = self.text_encoder.encode(prompts)
        return states.to(self.device, self.dtype), mask.to(self.device)

    def grid_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """Token grid (h, w) for an image size; defaults to the generator's ``image_size``."""
        f, size = self.generator.config.downsample, self.generator.config.image_size
        height, width = height or size, width or size
        if height % f or width % f:
            raise ValueError(f"height and width must be multiples of {f}, got {height} x {width}")
        return height // f, width // f

    def text_kv(self, states: Tensor, mask: Tensor | None, use_cfg: bool) -> TextKV:
        """The cross-attention K/V of a generation (:func:`dcar.sampling.encode_text_branches`: the captions' rows,
        then with ``use_cfg`` the null caption's). After :meth:`compile` with a CUDA-graph mode they are copied
        into buffers kept for the next generation of the same shape, marked static for torch.compile: a CUDA
        graph then reads them in place, instead of copying every block's K/V into its own input buffers at each
        of the steps (one copy per generation instead of one per step); a later call of the same shape then
        overwrites the returned tensors."""
        return self._static_text_kv_copy(encode_text_branches(self.generator, states, mask, use_cfg))

    def make_generator(self, seed: int | None = None, generator: torch.Generator | None = None) -> torch.Generator:
        """``generator`` as is, else a fresh one on the pipeline's device seeded with ``seed`` (None: random)."""
        if generator is not None:
            return generator
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return g

    def _head_residuals(self, hidden: Tensor, uncond: Tensor | None, codes: Tensor, gen: torch.Generator,
                        steps: int | None, scale: float, temperature: float) -> Tensor:
        """Residual tokens (B, D, h, w) from per-position hidden states (B, h*w, C) and codes (B, h, w)."""
        b, h, w = codes.shape
        res = self.generator.sample_residuals(hidden, codes.reshape(b, h * w), gen, steps, scale, temperature,
                                              uncond if scale != 1.0 else None)
        return res.transpose(1, 2).reshape(b, -1, h, w)

    @torch.no_grad()
    def generate_tokens(
        self,
        prompts: str | Sequence[str],
        num_steps: int = 12,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        *,
        cfg_schedule: str = "linear",
        temperature: float = 1.0,
        choice_temperature: float = 4.5,
        top_k: int | None = None,
        use_head: bool = True,
        head_steps: int | None = None,
        head_guidance_scale: float | None = None,
        head_temperature: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        logits_at_masked_only: bool = True,
        on_step: Callable[[int, Tensor], None] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Sample discrete codes (B, h, w) and, with a head, residual tokens (B, D, h, w) (else None).

        ``guidance_scale``/``cfg_schedule``: logit CFG (``"constant"`` or MAR's ``"linear"``); ``temperature``,
        ``top_k``: code sampling; ``choice_temperature``: MaskGIT's confidence noise (annealed to 0).
        ``head_steps`` (None: the head config's ``num_sampling_steps``), ``head_guidance_scale`` (None: the same
        as ``guidance_scale``, constant), ``head_temperature``: the residual sampler. ``use_head=False`` (or a
        discrete-only generator) skips residuals. ``on_step(step, tokens)`` observes the decoding.
        """
        model = self.generator
        need_head = use_head and model.head is not None
        head_scale = guidance_scale if head_guidance_scale is None else head_guidance_scale
        head_cfg = need_head and head_scale != 1.0
        use_cfg = guidance_scale != 1.0 or head_cfg
        masked_mode = need_head and model.head.config.loss_tokens == "masked"
        gen = self.make_generator(seed, generator)
        with eval_mode(model), self.autocast():
            states, mask = self.encode_prompts(prompts)
            kv = self.text_kv(states, mask, use_cfg)
            out = maskgit_decode(
                model, kv, states.shape[0], self.grid_size(height, width), use_cfg=use_cfg, num_steps=num_steps,
                guidance_scale=guidance_scale, cfg_schedule=cfg_schedule, temperature=temperature,
                choice_temperature=choice_temperature, top_k=top_k, generator=gen, keep_hidden=masked_mode,
                keep_uncond=masked_mode and head_cfg, logits_at_masked_only=logits_at_masked_only, on_step=on_step,
            )
            if not need_head:
                return out.codes, None
            if masked_mode:
                hidden, uncond = out.hidden, out.uncond_hidden
            else:  # loss_tokens="all": one more forward over the complete code map, reusing the K/V
                hidden, uncond, _ = branch_hidden(model, out.codes, kv, use_cfg)
            residual = self._head_residuals(hidden, uncond, out.codes, gen, head_steps, head_scale, head_temperature)
        return out.codes, residual

    @torch.no_grad()
    def refine_residuals(
        self,
        codes: Tensor,
        prompts: str | Sequence[str],
        *,
        context: str = "auto",
        num_steps: int = 12,
        head_steps: int | None = None,
        head_guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        head_temperature: float = 1.0,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample residual tokens (B, D, h, w) for given discrete ``codes`` (B, h, w) (e.g. ground truth).

        ``context="full"``: hidden states from one forward over the complete code map (the ``loss_tokens="all"``
        convention). ``"schedule"``: the masked-position convention of ``loss_tokens="masked"``: the cosine
        schedule of ``num_steps`` steps is replayed in a random (seeded) order with the given codes as the known
        tokens, and each position's hidden state is taken from the step that reveals it, while it is still
        [MASK] (random order = the training mask distribution; inference reveals by confidence instead).
        ``"auto"`` picks the one matching the head's ``loss_tokens``.
        """
        model = self.generator
        if model.head is None:
            raise RuntimeError("this generator is discrete-only (use_head=false): there is no residual head")
        if context == "auto":
            context = "schedule" if model.head.config.loss_tokens == "masked" else "full"
        if context not in ("full", "schedule"):
            raise ValueError(f"context must be 'auto', 'full' or 'schedule', got {context!r}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if codes.dim() != 3 or codes.shape[0] != len(prompts):
            raise ValueError(f"codes must be (B, h, w) with B = {len(prompts)} prompts, got {tuple(codes.shape)}")
        codes = codes.to(self.device).long()
        use_cfg = head_guidance_scale != 1.0
        gen = self.make_generator(seed, generator)
        with eval_mode(model), self.autocast():
            states, mask = self.encode_prompts(prompts)
            kv = self.text_kv(states, mask, use_cfg)
            if context == "full":
                hidden, uncond, _ = branch_hidden(model, codes, kv, use_cfg)
            else:
                hidden, uncond = self._schedule_hidden(codes, kv, use_cfg, num_steps, gen)
            return self._head_residuals(hidden, uncond, codes, gen, head_steps, head_guidance_scale, head_temperature)

    def _schedule_hidden(self, codes: Tensor, kv: TextKV, use_cfg: bool, num_steps: int,
                         gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """Per-position hidden states from a random-order replay of the decoding schedule (``context="schedule"``)."""
        b, h, w = codes.shape
        n = h * w
        flat = codes.reshape(b, n)
        rank = torch.rand((b, n), generator=gen, device=gen.device).to(self.device).argsort(1).argsort(1)
        hidden = uncond = None
        before = n  # tokens masked before the step
        for masked_after in mask_schedule_counts(num_steps, n):
            known, now = rank < n - before, (rank >= n - before) & (rank < n - masked_after)
            inp = torch.where(known, flat, self.generator.mask_token_id).view(b, h, w)
            cond_h, uncond_h, _ = branch_hidden(self.generator, inp, kv, use_cfg)
            hidden = torch.where(now[..., None], cond_h, 0.0 if hidden is None else hidden)
            if uncond_h is not None:
                uncond = torch.where(now[..., None], uncond_h, 0.0 if uncond is None else uncond)
            before = masked_after
        return hidden, uncond

    @torch.no_grad()
    def decode(self, codes: Tensor, residual: Tensor | None = None) -> Tensor:
        """DC-HT decoding of ``codebook[codes] (+ residual)`` to images (B, 3, H, W) clamped to [-1, 1]
        (through the :meth:`set_decoder_path` options)."""
        with eval_mode(self.tokenizer), self.autocast():
            tok_dtype = next(self.tokenizer.parameters()).dtype
            residual = None if residual is None else residual.to(tok_dtype)
            images = self.tokenizer.decode_indices(codes, residual, self._decoder())
            return images.float().clamp(-1.0, 1.0)

    def __call__(
        self,
        prompts: str | Sequence[str],
        num_steps: int = 12,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        *,
        seed: int | None = None,
        output_type: str = "pt",
        **kwargs: Any,
    ) -> Tensor | list:
        """Generate one image per prompt: a tensor (B, 3, H, W) in [-1, 1] or, with ``output_type="pil"``, a list
        of PIL images. Other keyword arguments are those of :meth:`generate_tokens` (``use_head``, ``height``,
        ``width``, ``cfg_schedule``, ``head_steps``, ``head_guidance_scale``, ``generator``, ...)."""
        if output_type not in ("pt", "pil"):
            raise ValueError(f"output_type must be 'pt' or 'pil', got {output_type!r}")
        codes, residual = self.generate_tokens(prompts, num_steps, guidance_scale, seed=seed, **kwargs)
        images = self.decode(codes, residual)
        if output_type == "pil":
            from PIL import Image

            from .train.logging import to_uint8

            return [Image.fromarray(a) for a in to_uint8(images).numpy()]
        return images
