"""Single-scale vector quantiser of DC-HT's latent, following HART's codebook.

HART (``hart/modules/models/autoencoder/quantize/var_quantize_multiple_res.py``): the codebook is an
``nn.Embedding(V, C)`` learned by gradient (no EMA update of the codes), the lookup is plain L2 nearest neighbour,
the straight-through estimator is ``zq = z + sg(zq - z)`` and the loss is ``beta * MSE(sg(zq), z) + MSE(zq, sg(z))``
with beta = 0.25 on the commitment term. DC-AR quantises one scale only, so HART's multi-scale residual machinery
(``Phi`` convs, ``v_patch_nums``) is not needed.

Additions (not in HART): the nearest-neighbour search runs over chunks of tokens, so a 512 px batch never holds a
(tokens x 16384) distance matrix larger than (chunk_size x 16384); usage statistics (perplexity, fraction of codes
used) and an optional running EMA of code frequencies; and an optional dead-code restart (off by default), the
usual remedy for codebook collapse (e.g. Jukebox / "random restart" of unused codes); and ``code_map``, the index
each nearest code emits (identity unless synonym codes were merged, :mod:`dcar.models.tokenizer.synonyms`).

Distributed training: in training mode, when ``torch.distributed`` is initialised with more than one rank, the code
counts are all-reduced (so statistics and the dead-code decision are global and identical on every rank) and the
restart vectors, drawn on each rank from its own batch with the torch RNG, are broadcast from rank 0. Every rank must
therefore call the quantiser's training forward the same number of times (which DDP already requires). Eval-mode
forwards never communicate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .config import QuantizerConfig


@dataclass
class QuantizerOutput:
    """``zq``: quantised latent (B, C, H, W) with straight-through gradient; ``indices`` (B, H, W) long;
    ``loss``: scalar VQ loss; ``stats``: detached scalar tensors (``perplexity``, ``codebook_usage``, ``restarted``)."""

    zq: Tensor
    indices: Tensor
    loss: Tensor
    stats: dict[str, Tensor]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def usage_stats(counts: Tensor) -> dict[str, Tensor]:
    """Perplexity ``exp(H(p))`` of the code frequencies ``p = counts / sum`` and the fraction of codes used."""
    counts = counts.float()
    p = counts / counts.sum().clamp_min(1.0)
    entropy = -torch.special.xlogy(p, p).sum()
    return {"perplexity": entropy.exp(), "codebook_usage": (counts > 0).float().mean()}


class VectorQuantizer(nn.Module):
    """L2 nearest-code VQ of a (B, C, H, W) latent with a learned ``nn.Embedding`` codebook (see module docstring)."""

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        self.codebook_size, self.dim, self.beta = config.codebook_size, config.dim, config.beta
        self.embedding = nn.Embedding(config.codebook_size, config.dim)
        # statistics, saved with the model: EMA of code frequencies and training steps since each code was last used
        self.register_buffer("usage_ema", torch.full((config.codebook_size,), 1.0 / config.codebook_size))
        self.register_buffer("steps_since_used", torch.zeros(config.codebook_size, dtype=torch.long))
        # code_map[i]: the index emitted when code i is nearest (identity unless synonym codes were merged, see
        # dcar.models.tokenizer.synonyms); saved with the model, identity when a file predates it
        self.register_buffer("code_map", torch.arange(config.codebook_size))
        self.reset_parameters()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if prefix + "code_map" not in state_dict:  # files written before synonym merging existed: identity map
            state_dict[prefix + "code_map"] = torch.arange(self.codebook_size)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def merged(self) -> bool:
        """Whether some codes are mapped to another (synonym) code."""
        return bool((self.code_map != torch.arange(self.codebook_size, device=self.code_map.device)).any())

    def reset_parameters(self) -> None:
        """Initialise the codebook: N(0, init_scale^2) or VAR/HART's ``eini<0`` uniform(+-init_scale/V)."""
        w = self.embedding.weight
        with torch.no_grad():
            if self.config.init == "normal":
                nn.init.normal_(w, std=self.config.init_scale)
            else:
                bound = self.config.init_scale / self.codebook_size
                nn.init.uniform_(w, -bound, bound)

    @torch.no_grad()
    def nearest_indices(self, flat: Tensor) -> Tensor:
        """Index of the nearest code (L2) for each row of ``flat`` (N, dim), computed ``chunk_size`` rows at a time.

        ``argmin ||x - e||^2 = argmin (||e||^2 - 2 x.e)``; distances are in fp32 whatever the input dtype.
        """
        weight = self.embedding.weight.detach().float()
        w_sq = weight.pow(2).sum(1)
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        step = self.config.chunk_size
        for start in range(0, flat.shape[0], step):
            x = flat[start : start + step].float()
            out[start : start + step] = torch.addmm(w_sq, x, weight.t(), alpha=-2.0).argmin(1)
        return out

    def lookup(self, indices: Tensor) -> Tensor:
        """Codebook vectors of ``indices`` (B, H, W) as a latent map (B, dim, H, W)."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise ``z`` (B, dim, H, W); in training mode also update the usage buffers and restart dead codes."""
        b, c, h, w = z.shape
        if c != self.dim:
            raise ValueError(f"latent has {c} channels, the codebook dim is {self.dim}")
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, c)
        nearest = self.nearest_indices(flat)
        indices = self.code_map[nearest]
        zq = self.lookup(indices.view(b, h, w)).to(z.dtype)
        # HART: commitment beta * MSE(sg(zq), z) + codebook MSE(zq, sg(z)); straight-through zq = z + sg(zq - z)
        loss = self.beta * F.mse_loss(zq.detach(), z) + F.mse_loss(zq, z.detach())
        zq_st = z + (zq - z).detach()

        counts = torch.bincount(indices, minlength=self.codebook_size)
        sync = self.training and _world_size() > 1
        if sync:
            dist.all_reduce(counts)
        stats = usage_stats(counts)
        if self.training and self.merged:  # usage and restarts follow the searched codes, not the emitted ones
            counts = torch.bincount(nearest, minlength=self.codebook_size)
            if sync:
                dist.all_reduce(counts)
        restarted = self._update_and_restart(counts, flat, sync) if self.training else 0
        stats["restarted"] = torch.tensor(float(restarted), device=z.device)
        return QuantizerOutput(zq=zq_st, indices=indices.view(b, h, w), loss=loss, stats=stats)

    @torch.no_grad()
    def _update_and_restart(self, counts: Tensor, flat: Tensor, sync: bool) -> int:
        """Update the usage buffers from (global) ``counts``; re-initialise codes unused for ``dead_code_steps``.

        A dead code gets a latent vector drawn without replacement (with, if the batch has fewer tokens than dead
        codes) from this batch with the torch RNG, so it is deterministic given the RNG state; under DDP rank 0's
        draw is broadcast. Returns the number of restarted codes. Optimiser moments of restarted rows are kept.
        """
        decay = self.config.usage_ema_decay
        if decay > 0:
            freq = counts.float() / counts.sum().clamp_min(1)
            self.usage_ema.mul_(decay).add_(freq, alpha=1.0 - decay)
        self.steps_since_used.add_(1).masked_fill_(counts > 0, 0)
        if not self.config.dead_code_restart:
            return 0
        dead = torch.nonzero(self.steps_since_used >= self.config.dead_code_steps).squeeze(1)
        n = dead.numel()
        if n == 0:
            return 0
        if flat.shape[0] >= n:
            pick = torch.randperm(flat.shape[0], device=flat.device)[:n]
        else:
            pick = torch.randint(flat.shape[0], (n,), device=flat.device)
        new = flat[pick].to(self.embedding.weight.dtype).contiguous()
        if sync:
            dist.broadcast(new, src=0)
        self.embedding.weight.data[dead] = new
        self.steps_since_used[dead] = 0
        return n
