"""Frozen text encoders for DC-AR captions, plus offline helpers and a safetensors feature cache.

Following PixArt-alpha (and DC-AR), captions are encoded by a frozen T5 encoder (T5-base here: 768-d states) into
per-token states padded/truncated to a fixed length (120 tokens, PixArt's), returned with a bool key-padding mask.
Any Hugging Face encoder whose output has ``last_hidden_state`` can be plugged in (``kind="hf"``, e.g. the offline
MiniLM). ``kind="t5-random"`` builds a randomly initialised T5 encoder from a config dict (T5-base dims by default)
and reads the tokenizer from a directory, e.g. one made by :func:`build_word_tokenizer` from a caption list; that
is how tests and the CPU shapes pipeline run without model downloads. ``trust_remote_code`` is never used.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch
from safetensors import safe_open
from torch import Tensor, nn

from dcar.utils.atomic import atomic_save_safetensors

from .config import TextEncoderConfig

__all__ = ["CachedText", "TextEncoder", "build_word_tokenizer", "context_features", "load_cached", "T5_BASE_DIMS"]

T5_BASE_DIMS = {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 12, "num_heads": 12}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_rotations(count: int, dim: int, seed: int) -> Tensor:
    """``count`` fixed random orthogonal (dim, dim) matrices (QR of seeded Gaussians, sign-corrected), float32."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(count, dim, dim, generator=gen, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]).float()


def context_features(states: Tensor, mask: Tensor, rotations: Tensor) -> Tensor:
    """``states`` (B, L, D) plus, at every valid token, ``sum_d R_d states[i + d] / sqrt(2w)`` over the valid
    neighbours ``0 < |d| <= w`` (``rotations`` (2w, D, D): offsets -w..-1 then 1..w); padded positions unchanged."""
    w = rotations.shape[0] // 2
    valid = mask[..., None].to(states.dtype)
    s = states * valid
    ctx = torch.zeros_like(states)
    for j, d in enumerate([*range(-w, 0), *range(1, w + 1)]):
        nb = torch.zeros_like(s)
        if d > 0:
            nb[:, :-d] = s[:, d:]
        else:
            nb[:, -d:] = s[:, :d]
        ctx = ctx + nb @ rotations[j].to(s.dtype).T
    return states + ctx * valid / (2 * w) ** 0.5


def build_word_tokenizer(captions: Iterable[str], out_dir: str | os.PathLike, lowercase: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` over the words of ``captions``, saved to ``out_dir`` and returned.

    T5's special-token layout: ``<pad>`` = 0, ``</s>`` = 1 (appended to every caption), ``<unk>`` = 2; words are
    split on whitespace and punctuation (``tokenizers``' ``Whitespace`` pre-tokenizer) and numbered in sorted order.
    Reload with ``transformers.AutoTokenizer.from_pretrained(out_dir)``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Whitespace()
    words: set[str] = set()
    for caption in captions:
        text = caption.lower() if lowercase else caption
        words.update(piece for piece, _ in pre.pre_tokenize_str(text))
    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(words - set(specials)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(out_dir))
    return fast


class CachedText(NamedTuple):
    """Precomputed text features: ``states`` (N, L, D), ``mask`` (N, L) bool, ``captions`` (N strings)."""

    states: Tensor
    mask: Tensor
    captions: list[str]


def load_cached(path: str | os.PathLike) -> CachedText:
    """Read features written by :meth:`TextEncoder.encode_and_cache` (exact round trip)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        states, mask = f.get_tensor("states"), f.get_tensor("mask").bool()
    return CachedText(states, mask, json.loads(meta.get("captions", "[]")))


def _load_error(what: str, name: str, err: Exception) -> OSError:
    return OSError(
        f"cannot load the text encoder {what} {name!r}: it is not a local directory and the Hugging Face Hub is "
        f"unreachable or has no such repo ({type(err).__name__}: {err}). Offline, pass a local directory, or use "
        "kind='t5-random' with a tokenizer directory (see build_word_tokenizer); set HF_HUB_OFFLINE=1 to skip the "
        "network retries."
    )


class TextEncoder(nn.Module):
    """A frozen text encoder: ``encode(captions) -> (states (B, max_length, D), mask (B, max_length) bool)``.

    Built from a :class:`TextEncoderConfig`; the model stays in eval mode with ``requires_grad=False`` and runs
    under ``torch.no_grad``. ``hidden_size`` is the state width D (DCAR's ``caption_dim``).
    """

    def __init__(self, config: TextEncoderConfig) -> None:
        super().__init__()
        config.validate()
        if config.kind == "t5-random" and not config.tokenizer_path:
            raise ValueError("kind='t5-random' needs tokenizer_path (a tokenizer directory, see build_word_tokenizer)")
        self.config = config
        self.tokenizer = self._load_tokenizer()
        self.model = self._load_model().to(_DTYPES[config.dtype])
        self.model.requires_grad_(False)
        self.model.eval()
        if config.context_window:  # fixed, derived from the seed: not saved, identical on every load
            rot = random_rotations(2 * config.context_window, self.hidden_size, config.seed + 1)
            self.register_buffer("context_rotations", rot.to(_DTYPES[config.dtype]), persistent=False)

    def _load_tokenizer(self):
        from transformers import AutoTokenizer

        c = self.config
        name = c.tokenizer_path or c.name_or_path
        try:
            return AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise _load_error("tokenizer", name, err) from err

    def _load_model(self) -> nn.Module:
        from transformers import AutoModel, T5Config, T5EncoderModel

        c = self.config
        if c.kind == "t5-random":
            dims = {**T5_BASE_DIMS, "vocab_size": len(self.tokenizer), **dict(c.t5_config)}
            if dims["vocab_size"] < len(self.tokenizer):
                raise ValueError(f"t5_config.vocab_size={dims['vocab_size']} < tokenizer size {len(self.tokenizer)}")
            dims.setdefault("pad_token_id", self.tokenizer.pad_token_id or 0)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(c.seed)
                return T5EncoderModel(T5Config(**dims))
        cls = T5EncoderModel if c.kind == "t5" else AutoModel
        try:
            return cls.from_pretrained(c.name_or_path)
        except OSError as err:
            raise _load_error("model", c.name_or_path, err) from err

    @property
    def hidden_size(self) -> int:
        """Width D of the returned states."""
        cfg = self.model.config
        return int(getattr(cfg, "d_model", None) or cfg.hidden_size)

    def train(self, mode: bool = True) -> TextEncoder:
        """The encoder is frozen: it always stays in eval mode."""
        super().train(False)
        return self

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Per-token states (B, max_length, D) in the encoder dtype and the bool mask (B, max_length)."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(captions), padding="max_length", truncation=True, max_length=self.config.max_length,
            return_tensors="pt",
        )
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        if self.model._compiled_call_impl is not None:  # CUDA-graph outputs are overwritten by the next replay
            states = states.clone()
        if self.config.context_window:  # see TextEncoderConfig: a random stand-in's states lack their context
            states = context_features(states, mask, self.context_rotations)
        if self.config.position_features:  # see TextEncoderConfig: word order for a random stand-in encoder
            from .transformer import sincos_1d

            pos = sincos_1d(torch.arange(states.shape[1], device=device), states.shape[-1]).to(states.dtype)
            states = states + pos[None] * mask[..., None].to(states.dtype)
        return states, mask.bool()

    def forward(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)

    def encode_and_cache(
        self, captions: Sequence[str], path: str | os.PathLike, batch_size: int = 64
    ) -> CachedText:
        """Encode ``captions`` in batches and store states, mask and the captions in a safetensors file."""
        captions = list(captions)
        parts = [self.encode(captions[i : i + batch_size]) for i in range(0, len(captions), batch_size)]
        if parts:
            states = torch.cat([s for s, _ in parts]).cpu().contiguous()
            mask = torch.cat([m for _, m in parts]).cpu().contiguous()
        else:
            states = torch.zeros(0, self.config.max_length, self.hidden_size, dtype=_DTYPES[self.config.dtype])
            mask = torch.zeros(0, self.config.max_length, dtype=torch.bool)
        meta = {"captions": json.dumps(captions), "encoder": self.config.name_or_path, "kind": self.config.kind,
                "max_length": str(self.config.max_length)}
        atomic_save_safetensors({"states": states, "mask": mask.to(torch.uint8)}, path, metadata=meta)
        return CachedText(states, mask, captions)
