"""DC-HT's three-stage adaptation training (DC-AR paper, section 3.1).

==========  ===========================  ======================  ====================================
stage       decoder input                trained                 losses
==========  ===========================  ======================  ====================================
warmup      continuous ``z``             encoder, decoder        recon + LPIPS + GAN
discrete    quantised ``zq``             encoder, VQ, decoder    recon + LPIPS + GAN + VQ
alternate   ``z`` or ``zq``, 50/50 per   decoder (+ D)           recon + LPIPS + GAN
            image                        (encoder, VQ frozen)
==========  ===========================  ======================  ====================================

The alternate stage's per-image path choice follows HART's hybrid quantizer (``skip_continuous_prob=0.5``); its
frozen encoder + codebook follows HART's ``freeze_codebook_for_hybrid``. The decoder's BatchNorm layers stay in
training mode while the decoder trains (batch statistics, running averages updated), as in DC-AE's decoder; the
frozen encoder and quantizer run in eval mode (:meth:`DCHT.train`). Each stage starts from the previous stage's
weights through ``init_from``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dcar.config.loader import ConfigError
from dcar.config.schema import TrainConfig, choice
from dcar.data.build import build_dataset
from dcar.data.collate import collate
from dcar.losses.tokenizer_loss import TokenizerLoss, TokenizerLossConfig, check_loss_assets
from dcar.models.tokenizer import DCHT, DCHTConfig
from dcar.train import checkpoint as ckpt
from dcar.train.logging import save_image_grid
from dcar.train.optim import build_optimizer
from dcar.train.trainer import Trainer
from dcar.utils.modes import eval_mode


@dataclass(frozen=True)
class StageSpec:
    """What one training stage feeds the decoder and which parts it trains."""

    p_continuous: float  # probability that an image takes the continuous path
    train_encoder: bool
    train_quantizer: bool
    use_vq_loss: bool


STAGES: dict[str, StageSpec] = {
    "warmup": StageSpec(p_continuous=1.0, train_encoder=True, train_quantizer=False, use_vq_loss=False),
    "discrete": StageSpec(p_continuous=0.0, train_encoder=True, train_quantizer=True, use_vq_loss=True),
    "alternate": StageSpec(p_continuous=0.5, train_encoder=False, train_quantizer=False, use_vq_loss=False),
}


@dataclass
class TokenizerTrainConfig(TrainConfig):
    """``scripts/train_tokenizer.py``: the shared keys plus the stage, the DC-HT model and the loss."""

    stage: str = choice("warmup", *STAGES)
    model: DCHTConfig = field(default_factory=DCHTConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    num_preview: int = 8  # images in the reconstruction grids written at each checkpoint
    # Codebook initialisation when a stage that trains the quantiser starts from ``init_from`` (not on resume):
    # "keep" the loaded codebook, or "kmeans": k-means++ / Lloyd centroids of the loaded encoder's latents on the
    # first ``codebook_init_images`` training images (dcar.models.tokenizer.kmeans; SoundStream / EnCodec practice).
    # With "kmeans" the loaded checkpoint's quantiser state is not used, so its codebook size may differ.
    codebook_init: str = choice("keep", "keep", "kmeans")
    codebook_init_images: int = 1024
    codebook_init_iters: int = 20
    # Synonym merging when the alternate stage starts from ``init_from`` (not on resume): codes that only ever stand
    # for the same patch (within merge_codes_tol, pixels in [-1, 1]) on the first ``merge_codes_images`` training
    # images are mapped to one canonical code (dcar.models.tokenizer.synonyms); the decoder then trains on those.
    merge_codes: bool = False
    merge_codes_images: int = 1024
    merge_codes_tol: float = 0.02
    # Brightness synonyms (dcar.models.tokenizer.synonyms): the merge images are encoded again with their
    # intensities (in [0, 1]) times each gain; codes that land on one code of the originals on at least
    # merge_codes_gain_purity of their occurrences join its group. [] (default): off.
    merge_codes_gains: list[float] = field(default_factory=list)
    merge_codes_gain_purity: float = 0.8

    def __post_init__(self) -> None:
        if any(g <= 0 or g == 1 for g in self.merge_codes_gains):
            raise ConfigError(f"'merge_codes_gains' must be positive and != 1, got {self.merge_codes_gains}")
        if not 0.5 < self.merge_codes_gain_purity <= 1.0:
            raise ConfigError(f"'merge_codes_gain_purity' must lie in (0.5, 1], got {self.merge_codes_gain_purity}")


def mix_latents(z: torch.Tensor, zq: torch.Tensor, p_continuous: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, ``z`` with probability ``p_continuous`` else ``zq``; also returns the boolean choice."""
    if p_continuous >= 1.0:
        return z, torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    if p_continuous <= 0.0:
        return zq, torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
    pick = torch.rand(z.shape[0], device=z.device) < p_continuous
    return torch.where(pick[:, None, None, None], z, zq), pick


class HybridStep(nn.Module):
    """The differentiable part of one tokenizer step, wrapped so that DDP sees a single ``forward``."""

    def __init__(self, tokenizer: DCHT) -> None:
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, images: torch.Tensor, p_continuous: float):
        out = self.tokenizer.encode(images)
        latent, pick = mix_latents(out.z, out.zq, p_continuous)
        return self.tokenizer.decode(latent), out, pick


class TokenizerTrainer(Trainer):
    """Trains DC-HT for one stage; ``modules = {"model": HybridStep(DCHT), "disc": PatchGAN}``."""

    cfg: TokenizerTrainConfig
    backward_twice = True  # the adaptive GAN weight's two autograd.grad calls before the step's backward

    def __init__(self, cfg: TokenizerTrainConfig, **kwargs: Any) -> None:
        super().__init__(cfg, **kwargs)
        self.spec = STAGES[cfg.stage]
        check_loss_assets(cfg.loss)  # a missing LPIPS backbone fails here, before anything is built

    def build_dataset(self):
        acc = self.accelerator
        return build_dataset(self.cfg.data, "train", acc.process_index, acc.num_processes)

    def build_modules(self) -> dict[str, nn.Module]:
        self.loss_fn = TokenizerLoss(self.cfg.loss)  # built here, after seeding: the discriminator's init is seeded
        tokenizer = DCHT(self.cfg.model)
        tokenizer.set_trainable(encoder=self.spec.train_encoder, quantizer=self.spec.train_quantizer, decoder=True)
        modules: dict[str, nn.Module] = {"model": HybridStep(tokenizer)}
        if self.loss_fn.discriminator is not None:
            modules["disc"] = self.loss_fn.discriminator
        self.loss_fn.to(self.device)
        return modules

    def build_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        opts = {"model": build_optimizer([self.modules["model"]], self.cfg.optim)}
        if "disc" in self.modules:
            opts["disc"] = build_optimizer([self.modules["disc"]], self.cfg.optim, lr_mult=self.cfg.loss.disc_lr_mult)
        return opts

    def load_init(self, path: str) -> None:
        """``init_from``: a DC-HT ``save_pretrained`` folder (a previous stage's ``final/``) or a checkpoint."""
        path_ = Path(path)
        file = path_ / "model.safetensors"
        if not file.is_file():
            super().load_init(path)  # raises the shared error that names what init_from expects
        step = self.unwrap("model")
        # a save_pretrained folder (with config.json) holds DCHT keys, a checkpoint HybridStep's ("tokenizer." + ...)
        module, prefix = (step.tokenizer, "") if (path_ / "config.json").is_file() else (step, "tokenizer.")
        # with k-means the codebook is rebuilt below: the file's quantiser state (any codebook size) is not loaded
        reinit_codebook = self.cfg.codebook_init == "kmeans" and self.spec.train_quantizer
        ckpt.load_module(module, file, skip=(f"{prefix}quantizer.",) if reinit_codebook else ())
        if reinit_codebook:
            self.init_codebook_kmeans()
        if self.cfg.merge_codes and self.cfg.stage == "alternate":
            self.merge_synonym_codes()

    @torch.no_grad()
    def _encode_train_images(
        self, num_images: int, keep_images: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(images or None, latents z) of the first ``num_images`` training images through the loaded encoder (eval
        mode), on the CPU; the same images on every rank."""
        from torch.utils.data import DataLoader

        loader = DataLoader(build_dataset(self.cfg.data, "train"), batch_size=self.cfg.train.batch_size,
                            collate_fn=collate, shuffle=False)
        images, latents, seen = [], [], 0
        for batch in loader:
            if "image" not in batch:
                continue
            x = batch["image"]
            if keep_images:
                images.append(x)
            latents.append(self._encode(x))
            seen += x.shape[0]
            if seen >= num_images:
                break
        return (torch.cat(images) if keep_images else None), torch.cat(latents)

    def _broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's ``tensor`` on every rank (bit-equal state on GPUs, where kernels may differ in the last bit)."""
        if self.accelerator.num_processes > 1:
            torch.distributed.broadcast(tensor, src=0)
        return tensor

    @torch.no_grad()
    def init_codebook_kmeans(self) -> None:
        """Set the codebook to k-means centroids of encoder latents (see ``codebook_init``); identical on all
        ranks."""
        from dcar.models.tokenizer.kmeans import kmeans

        cfg, quantizer = self.cfg, self.unwrap("model").tokenizer.quantizer
        _, z = self._encode_train_images(cfg.codebook_init_images, keep_images=False)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
        centres = kmeans(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), quantizer.codebook_size,
                         cfg.codebook_init_iters, gen)
        weight = quantizer.embedding.weight
        weight.data.copy_(self._broadcast(centres.to(weight.device, weight.dtype)))
        quantizer.steps_since_used.zero_()
        if self.accelerator.is_main_process:
            print(f"[dcar] codebook initialised by k-means on {z.shape[0]} images ({centres.shape[0]} codes)")

    @torch.no_grad()
    def merge_synonym_codes(self) -> None:
        """Map synonym codes to canonical ones (``merge_codes``; dcar.models.tokenizer.synonyms)."""
        from dcar.models.tokenizer.synonyms import find_gain_synonyms, find_synonyms, patchify, unite_codes

        cfg, tokenizer = self.cfg, self.unwrap("model").tokenizer
        quantizer = tokenizer.quantizer
        images, z = self._encode_train_images(cfg.merge_codes_images)
        assert images is not None
        nearest = self._latent_codes(z)
        patch = images.shape[-1] // z.shape[-1]
        code_map = find_synonyms(nearest, patchify(images, patch), quantizer.codebook_size, cfg.merge_codes_tol)
        if cfg.merge_codes_gains:
            scaled = [self._latent_codes(self._encode(((images + 1) * g - 1).clamp(-1, 1)))  # intensities x g
                      for g in cfg.merge_codes_gains]
            edges = [find_gain_synonyms(nearest, codes, quantizer.codebook_size, cfg.merge_codes_gain_purity)
                     for codes in scaled]
            counts = torch.bincount(nearest, minlength=quantizer.codebook_size)
            code_map = unite_codes(code_map, torch.cat(edges), counts)
        quantizer.code_map.copy_(self._broadcast(code_map.to(quantizer.code_map.device)))
        if self.accelerator.is_main_process:
            used = torch.unique(nearest).numel()
            emitted = torch.unique(code_map[nearest]).numel()
            print(f"[dcar] merged synonym codes on {images.shape[0]} images: {used} codes in use -> {emitted}")

    def _latent_codes(self, z: torch.Tensor) -> torch.Tensor:
        """The quantiser's nearest codes (N,) of latents ``z`` (B, C, h, w), in row-major token order, on the CPU."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]).to(self.device)
        return self.unwrap("model").tokenizer.quantizer.nearest_indices(flat).cpu()

    @torch.no_grad()
    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """Latents (on the CPU) of ``images`` (B, 3, H, W) through the encoder in eval mode, in training-batch
        chunks."""
        tokenizer = self.unwrap("model").tokenizer
        with eval_mode(tokenizer):
            z = [tokenizer.encoder(x.to(self.device)).float().cpu() for x in images.split(self.cfg.train.batch_size)]
        return torch.cat(z)

    def export_model(self) -> nn.Module:
        model = self.ema.shadow if self.ema is not None else self.unwrap("model")
        return model.tokenizer

    def _last_layer(self) -> torch.Tensor:
        """The decoder's output conv weight: where VQGAN's adaptive GAN weight compares gradient norms."""
        return self.unwrap("model").tokenizer.decoder.conv_out.conv.weight

    def train_step(self, batch: dict[str, Any], step: int) -> dict[str, float]:
        images = batch["image"]
        disc = self.modules.get("disc")
        if disc is not None:
            disc.requires_grad_(False)
        recon, out, pick = self.modules["model"](images, self.spec.p_continuous)
        vq_loss = out.vq_loss if self.spec.use_vq_loss else None
        loss, logs = self.loss_fn.generator_loss(images, recon, vq_loss, step, last_layer=self._last_layer())
        self.optimize("model", loss)
        logs = {f"loss/{k}" if not k.startswith("loss") else k: v for k, v in logs.items()}
        logs["loss"] = float(loss.detach())
        logs["frac_continuous"] = float(pick.float().mean())
        logs.update({f"vq/{k}": float(v) for k, v in out.stats.items()})
        if disc is not None and self.loss_fn.discriminator_active(step):
            disc.requires_grad_(True)
            d_loss, d_logs = self.loss_fn.discriminator_loss(images, recon.detach(), step)
            self.optimize("disc", d_loss)
            logs.update({f"disc/{k}": v for k, v in d_logs.items()})
        return logs

    @torch.no_grad()
    def on_checkpoint(self, step: int) -> None:
        """Write a grid: originals, continuous-path and discrete-path reconstructions (EMA weights if any)."""
        model = (self.ema.shadow if self.ema is not None else self.unwrap("model")).tokenizer
        dataset = build_dataset(self.cfg.data, split="heldout")
        n = min(self.cfg.num_preview, len(dataset))
        images = torch.stack([dataset[i]["image"] for i in range(n)]).to(self.device)
        with eval_mode(model):
            out = model.encode(images)
            rows = torch.cat([images, model.decode(out.z).clamp(-1, 1), model.decode(out.zq).clamp(-1, 1)])
        save_image_grid(rows, self.run_dir / "images" / f"recon_{step:08d}.png", nrow=n)
