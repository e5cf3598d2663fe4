"""k-means codebook initialisation from encoder outputs (the data-dependent init of SoundStream / EnCodec VQ).

Why: at the start of DC-HT's discrete stage the warmed-up encoder's latents have a scale and layout that a random
N(0, 1) codebook does not match, so most codes are dead and the first hundreds of steps only move codes towards the
data. Starting from k-means centroids of real latents gives a usable discrete path at step 0 (and the dead-code
restart keeps it alive afterwards). Algorithm: k-means++ seeding (Arthur & Vassilvitskii, 2007) then Lloyd
iterations; empty clusters are re-seeded from random points. Written here because it is twenty lines of torch and
the usual libraries (scikit-learn, faiss) are not dependencies of dcar.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kmeans", "kmeans_plus_plus"]


def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared L2 distances (N, K) between rows of ``x`` (N, D) and ``c`` (K, D), clamped at 0."""
    return torch.addmm(c.pow(2).sum(1)[None], x, c.t(), alpha=-2.0).add_(x.pow(2).sum(1, keepdim=True)).clamp_min_(0)


def kmeans_plus_plus(x: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
    """k-means++ seeds (k, D): each next centre is drawn with probability proportional to the squared distance to
    the nearest centre so far (uniformly once every point coincides with a centre, e.g. fewer distinct points than
    ``k``)."""
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    nearest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):
        total = float(nearest.sum())
        probs = nearest / total if total > 0 else torch.full_like(nearest, 1.0 / n)
        i = int(torch.multinomial(probs, 1, generator=generator))
        centres.append(x[i])
        nearest = torch.minimum(nearest, (x - x[i]).pow(2).sum(1))
    return torch.stack(centres)


def kmeans(x: Tensor, k: int, iters: int = 20, generator: torch.Generator | None = None) -> Tensor:
    """Centroids (k, D) of the rows of ``x`` (N, D) after k-means++ seeding and ``iters`` Lloyd iterations (fp32).

    Deterministic for a given ``generator`` state. ``N`` should exceed ``k``; with fewer points every point becomes a
    centroid and the rest are duplicates (which the dead-code restart re-targets during training)."""
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects a non-empty (N, D) tensor, got shape {tuple(x.shape)}")
    x = x.float()
    centres = kmeans_plus_plus(x, k, generator)
    for _ in range(iters):
        assign = _sq_dist(x, centres).argmin(1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        empty = counts == 0
        centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None].float())
        if bool(empty.any()):
            pick = torch.randint(x.shape[0], (int(empty.sum()),), generator=generator)
            centres[empty] = x[pick]
    return centres
