"""DC-AR generator training: masked-token cross-entropy on DC-HT's discrete tokens + diffusion loss on residuals.

Per step (DC-AR paper section 3.2; MaskGIT masking, MAR diffusion loss, HART head condition):

1. the frozen DC-HT encodes the images: token ids ``indices`` (B, h, w) and residual tokens ``z - zq``;
2. the frozen text encoder encodes the captions; 10% of captions are replaced by the null caption (PixArt's
   ``class_dropout_prob``; HART's ``randn`` typo, which drops ~54%, is not copied);
3. a mask ratio per image (``model.train_mask_ratio``: MaskGIT's cosine by default) replaces tokens by [MASK];
4. loss = CE(logits, ids) on masked positions (``label_smoothing``; MaskGIT uses 0.1)
   + ``head_loss_weight`` x diffusion loss of the residuals, conditioned on ``hidden + embed(code)`` of the
   masked positions (``head.loss_tokens = masked``; MAR weights its diffusion loss by the mask the same way).

The DC-HT tokenizer (``tokenizer=PATH``, a ``save_pretrained`` folder) and the text encoder are frozen inputs,
not trained modules; their locations are recorded in the run's ``config.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dcar.config.schema import TrainConfig
from dcar.data.build import build_dataset
from dcar.models.generator import DCAR, DCARConfig, TextEncoder, TextEncoderConfig
from dcar.models.tokenizer import DCHT
from dcar.train.trainer import Trainer


@dataclass
class GeneratorTrainConfig(TrainConfig):
    """``scripts/train_generator.py``: the shared keys plus the generator, its text encoder and its tokenizer."""

    model: DCARConfig = field(default_factory=DCARConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    tokenizer: str = ""  # DC-HT save_pretrained folder or Hub id (required)
    caption_dropout: float = 0.1
    label_smoothing: float = 0.1
    head_loss_weight: float = 1.0
    # Replace model.head.residual_scale by this quantile of |z - zq| over 256 training images (the head's targets
    # are residual / scale, so clipping at +-1 keeps nearly all of them); 0 keeps the configured value.
    residual_scale_quantile: float = 0.999
    num_preview: int = 8


class GeneratorStep(nn.Module):
    """The differentiable part of one step (one ``forward`` for DDP): masked-token CE + residual diffusion loss."""

    def __init__(self, generator: DCAR, label_smoothing: float, head_loss_weight: float) -> None:
        super().__init__()
        self.generator = generator
        self.label_smoothing = label_smoothing
        self.head_loss_weight = head_loss_weight

    def forward(self, indices: torch.Tensor, residual: torch.Tensor | None, text_states: torch.Tensor,
                text_mask: torch.Tensor, drop_text: torch.Tensor) -> dict[str, torch.Tensor]:
        gen = self.generator
        tokens, mask = gen.random_mask(indices)
        logits, hidden = gen(tokens, text_states, text_mask, drop_text)
        flat_mask = mask.flatten(1)
        ce = F.cross_entropy(logits[flat_mask].float(), indices.flatten(1)[flat_mask],
                             label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (logits[flat_mask].argmax(-1) == indices.flatten(1)[flat_mask]).float().mean()
        out = {"ce": ce, "token_acc": acc, "loss": ce}
        if gen.head is not None and residual is not None:
            diff = self._head_loss(hidden, indices, residual, mask)
            out["diffusion"] = diff
            out["loss"] = ce + self.head_loss_weight * diff
        return out

    @torch.compiler.disable
    def _head_loss(self, hidden: torch.Tensor, indices: torch.Tensor, residual: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """The residual diffusion loss at the masked positions; eager under ``train.compile``: their number changes
        every step, and dynamo cannot draw the per-token timesteps (``randint``) for a symbolic count."""
        return self.generator.head_loss(hidden, indices, residual, weight_mask=mask)


def word_vocabulary_captions(cfg: GeneratorTrainConfig) -> list[str]:
    """Every caption the shapes data can produce (train and held-out share one vocabulary of words), plus the
    lighting phrases (always: a token cache does not say whether its captions carry them)."""
    from dcar.data.shapes import LIGHTING_PHRASES, split_captions

    s = cfg.data.shapes
    return sorted(split_captions("train", cfg.data.seed, s.max_objects) |
                  split_captions("heldout", cfg.data.seed, s.max_objects) | set(LIGHTING_PHRASES.values()))


def _is_shapes_data(cfg: GeneratorTrainConfig) -> bool:
    """Shapes data, read directly or through a token cache made from it (``cache.json``'s ``source.data``)."""
    if cfg.data.kind == "tokens" and cfg.data.path:
        from dcar.data.token_cache import read_cache_meta

        try:
            return read_cache_meta(cfg.data.path).get("source", {}).get("data") == "shapes"
        except FileNotFoundError:
            return False
    return cfg.data.kind == "shapes"


def build_frozen_text_encoder(cfg: GeneratorTrainConfig, run_dir: Path, shapes: bool | None = None) -> TextEncoder:
    """The configured encoder; a ``t5-random`` encoder without a tokenizer gets a word-level one built from the
    shapes vocabulary (``<run.dir>/text_tokenizer``), also for a token cache of shapes images. ``shapes`` says
    whether the data are shapes (None: read from ``cfg.data``, e.g. an existing cache's ``cache.json``)."""
    te = cfg.text_encoder
    if te.kind == "t5-random" and not te.tokenizer_path:
        if not (_is_shapes_data(cfg) if shapes is None else shapes):
            raise ValueError("text_encoder.kind=t5-random needs text_encoder.tokenizer_path for non-shapes data")
        from dcar.models.generator import build_word_tokenizer

        path = run_dir / "text_tokenizer"
        if not (path / "tokenizer.json").is_file():
            build_word_tokenizer(word_vocabulary_captions(cfg), path)
        te = dataclasses.replace(te, tokenizer_path=str(path))
    return TextEncoder(te)


@torch.no_grad()
def estimate_residual_scale(tokenizer: DCHT, images: torch.Tensor, quantile: float) -> float:
    """A high quantile of |residual| over ``images`` (3 significant digits): the head's target normaliser."""
    return residual_quantile(tokenizer.encode(images).residual, quantile)


def residual_quantile(residual: torch.Tensor, quantile: float) -> float:
    """The ``quantile`` of ``|residual|`` rounded to 3 significant digits (at least 1e-3)."""
    value = float(torch.quantile(residual.abs().flatten().float()[: 2**24], quantile))
    return float(f"{max(value, 1e-3):.3g}")


class GeneratorTrainer(Trainer):
    """Trains DC-AR on top of a frozen DC-HT; ``modules = {"model": GeneratorStep(DCAR)}``."""

    cfg: GeneratorTrainConfig

    def __init__(self, cfg: GeneratorTrainConfig, **kwargs: Any) -> None:
        if not cfg.tokenizer:
            from dcar.config.loader import ConfigError

            raise ConfigError("tokenizer=PATH is required: a DC-HT save_pretrained folder (e.g. a run's final/)")
        super().__init__(cfg, **kwargs)

    def build_dataset(self):
        acc = self.accelerator
        return build_dataset(self.cfg.data, "train", acc.process_index, acc.num_processes)

    def build_modules(self) -> dict[str, nn.Module]:
        cfg = self.cfg
        self.tokenizer = DCHT.from_pretrained(cfg.tokenizer).to(self.device).eval().requires_grad_(False)
        with self.accelerator.main_process_first():  # the main process writes <run.dir>/text_tokenizer, once
            self.text_encoder = build_frozen_text_encoder(cfg, self.run_dir).to(self.device)
        model_cfg = cfg.model
        if model_cfg.use_head and cfg.init_from:  # keep the scale the initial head was trained with
            scale = json.loads((Path(cfg.init_from) / "config.json").read_text())["head"]["residual_scale"]
            model_cfg = dataclasses.replace(model_cfg, head=dataclasses.replace(model_cfg.head, residual_scale=scale))
        elif model_cfg.use_head and cfg.residual_scale_quantile > 0:
            n = min(len(self.dataset), 256)
            items = [self.dataset[i] for i in range(n)]
            if "residual" in items[0]:  # a token cache (data.kind=tokens)
                scale = residual_quantile(torch.stack([it["residual"] for it in items]), cfg.residual_scale_quantile)
            else:
                images = torch.stack([it["image"] for it in items]).to(self.device)
                scale = estimate_residual_scale(self.tokenizer, images, cfg.residual_scale_quantile)
            model_cfg = dataclasses.replace(model_cfg, head=dataclasses.replace(model_cfg.head, residual_scale=scale))
        if model_cfg.caption_dim != self.text_encoder.hidden_size:
            raise ValueError(f"model.caption_dim={model_cfg.caption_dim} but the text encoder gives "
                             f"{self.text_encoder.hidden_size}-d states")
        self.model_config = model_cfg
        return {"model": GeneratorStep(DCAR(model_cfg), cfg.label_smoothing, cfg.head_loss_weight)}

    def load_init(self, path: str) -> None:
        """``init_from``: a DCAR ``save_pretrained`` folder (e.g. the 256 px model for the 512 px fine-tune)."""
        gen = self.unwrap("model").generator
        gen.load_state_dict(DCAR.from_pretrained(path).state_dict())

    def export_model(self) -> nn.Module:
        return (self.ema.shadow if self.ema is not None else self.unwrap("model")).generator

    def fit(self) -> Path:
        """Train, then also write a complete sampling pipeline (tokenizer + generator + text encoder) to
        ``<run.dir>/pipeline`` for ``scripts/sample.py pipeline=...`` and the evaluation commands."""
        from dcar.pipeline import DCARPipeline

        final = super().fit()
        if self.accelerator.is_main_process:
            pipe = DCARPipeline(self.tokenizer, DCAR.from_pretrained(final).to(self.device), self.text_encoder)
            pipe.save_pretrained(self.run_dir / "pipeline")
        self.accelerator.wait_for_everyone()
        return final

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        indices, residual = self.tokens_of(batch)
        if "text_states" in batch:  # a token cache with text features
            states, text_mask = batch["text_states"], batch["text_mask"]
        else:
            with torch.no_grad():
                states, text_mask = self.text_encoder.encode(batch["caption"])
        drop = torch.rand(indices.shape[0], device=self.device) < self.cfg.caption_dropout
        residual = residual if self.model_config.use_head else None
        out = self.modules["model"](indices, residual, states.float(), text_mask, drop)
        self.optimize("model", out["loss"])
        return {("loss" if k == "loss" else f"loss/{k}" if k != "token_acc" else k): float(v.detach())
                for k, v in out.items()}

    @torch.no_grad()
    def tokens_of(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, residual)`` of a batch: read from a token cache, or encoded by the frozen tokenizer."""
        if "indices" in batch:
            return batch["indices"], batch["residual"]
        enc = self.tokenizer.encode(batch["image"])
        return enc.indices, enc.residual

    @torch.no_grad()
    def on_checkpoint(self, step: int) -> None:
        """Sample held-out captions with the current (EMA) weights and save a captioned grid."""
        if self.cfg.num_preview <= 0:
            return
        from dcar.pipeline import DCARPipeline
        from dcar.train.logging import save_image_grid

        data = build_dataset(self.cfg.data, "heldout")
        captions = [data[i]["caption"] for i in range(min(self.cfg.num_preview, len(data)))]
        pipe = DCARPipeline(self.tokenizer, self.export_model(), self.text_encoder)
        images = pipe(captions, seed=self.cfg.seed)  # in eval mode: the pipeline restores the modes after
        save_image_grid(images, self.run_dir / "images" / f"samples_{step:08d}.png", captions=captions)
