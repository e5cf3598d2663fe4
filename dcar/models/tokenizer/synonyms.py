"""Merging synonym codes: codes that only ever stand for the same image patch are mapped to one of them.

Why (measured on the shapes DC-HT, README "Results measured so far"): k-means initialises the codebook in
proportion to where the latents lie, and the encoder's latent of an empty patch carries traces of its neighbours,
so the most frequent patch (plain background, 57-68% of the tokens) is spread over hundreds of codes. The discrete
path decodes all of them to the same patch, but a generator trained on the indices must predict which synonym the
encoder happened to pick: most of its cross-entropy is that noise (H(code | patch) = 4.0 of the 6.3 nats of the code
entropy on token-aligned shapes) and its samples suffer.

Rule (written here; no library does it): over the tokens of some training images, a code is *pure* when every
patch it quantises lies within ``tol`` (max abs pixel difference) of the mean patch of that code. Pure codes whose
mean patches lie within ``tol`` of each other are synonyms: visiting pure codes from the most to the least used,
each one not yet taken becomes a canonical code and takes every later pure code close to it. The quantiser then
emits the canonical index (``VectorQuantizer.code_map``) while its nearest-neighbour search, codebook and encoder
stay as they are, so ``z = zq + zr`` still holds exactly: the difference between synonyms moves into the residual,
which is what DC-HT's residual tokens are for. Impure and unused codes keep their own index.

Used at the start of the ``alternate`` stage (``merge_codes=true``; encoder and codebook are frozen from then on,
so the map stays valid), so the decoder learns the canonical codes.

Brightness synonyms (``merge_codes_gains``): the purity test above cannot join the codes of one object patch seen
at two exposures when the code also covers other patches (object edges at several offsets, shadows), yet a code
that changes with the global brightness makes the generator predict the brightness through its codes. So the same
images are encoded again with their intensities scaled by a gain, and each code of the scaled tokens that lands, on
at least ``purity`` of its occurrences, on one code of the original tokens is joined with it (both directions).
Joined groups and the synonym groups are united (:func:`unite_codes`); each group emits its most used code. The
brightness then moves (in part: the lower ``purity``, the more) into the residual tokens, where DC-AR's head
restores it from the caption ("in dim light"). Written here; no library does it.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["find_gain_synonyms", "find_synonyms", "patchify", "unite_codes"]


def patchify(images: Tensor, patch: int) -> Tensor:
    """(B, C, H, W) images -> (B * H/patch * W/patch, C * patch * patch) patches, in the row-major token order of
    a (B, H/patch, W/patch) index map."""
    b, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {patch}")
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b * (h // patch) * (w // patch), c * patch * patch)


@torch.no_grad()
def find_synonyms(indices: Tensor, patches: Tensor, codebook_size: int, tol: float = 0.02) -> Tensor:
    """The code map (codebook_size,) long: ``map[i]`` = the canonical code of code ``i`` (see module docstring).

    ``indices`` (N,) are the codes the quantiser chose for ``patches`` (N, P) (pixels, any fixed range; ``tol`` is
    in that range's units)."""
    if indices.dim() != 1 or patches.dim() != 2 or indices.shape[0] != patches.shape[0]:
        raise ValueError(f"expected indices (N,) and patches (N, P); got {tuple(indices.shape)} and "
                         f"{tuple(patches.shape)}")
    indices = indices.long().cpu()
    patches = patches.float().cpu()
    counts = torch.bincount(indices, minlength=codebook_size)
    means = torch.zeros(codebook_size, patches.shape[1]).index_add_(0, indices, patches)
    means /= counts.clamp_min(1)[:, None].float()
    spread = torch.zeros(codebook_size).scatter_reduce_(
        0, indices, (patches - means[indices]).abs().amax(1), reduce="amax")
    pure = (counts > 0) & (spread <= tol)
    code_map = torch.arange(codebook_size)
    taken = ~pure
    for code in torch.argsort(counts, descending=True, stable=True).tolist():
        if taken[code]:
            continue
        close = (means - means[code]).abs().amax(1) <= tol
        group = close & ~taken
        code_map[group] = code
        taken |= group
    return code_map


@torch.no_grad()
def find_gain_synonyms(base: Tensor, scaled: Tensor, codebook_size: int, purity: float = 0.8,
                       min_count: int = 4) -> Tensor:
    """Edges (K, 2) long between codes that stand for the same patches under a global brightness change.

    ``base`` (N,) are the codes of some tokens, ``scaled`` (N,) the codes of the same tokens after their image's
    intensities were scaled by a gain. Code ``a`` of one side is joined with code ``b`` of the other when ``b``
    holds at least ``purity`` of ``a``'s occurrences and ``a`` occurs at least ``min_count`` times; both directions
    are tested. Pairs of equal codes are left out."""
    if base.shape != scaled.shape or base.dim() != 1:
        raise ValueError(f"expected two (N,) code tensors; got {tuple(base.shape)} and {tuple(scaled.shape)}")
    if not 0.5 < purity <= 1.0:
        raise ValueError(f"purity must lie in (0.5, 1] (one partner per code), got {purity}")
    base, scaled = base.long().cpu(), scaled.long().cpu()
    edges = []
    for src, dst in ((scaled, base), (base, scaled)):
        pairs, count = torch.unique(src * codebook_size + dst, return_counts=True)
        a, b = pairs // codebook_size, pairs % codebook_size
        total = torch.bincount(src, minlength=codebook_size)[a]
        keep = (count >= purity * total) & (total >= min_count) & (a != b)
        edges.append(torch.stack([a[keep], b[keep]], dim=1))
    return torch.cat(edges)


def unite_codes(code_map: Tensor, edges: Tensor, counts: Tensor) -> Tensor:
    """The code map of the union of ``code_map``'s groups (``i`` with ``code_map[i]``) and ``edges`` (K, 2): each
    connected group of codes emits its most used code (``counts``, ties to the lowest index); a code in no group
    keeps its own index."""
    size = code_map.shape[0]
    parent = list(range(size))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    links = [(i, int(j)) for i, j in enumerate(code_map.tolist()) if i != j] + [tuple(e) for e in edges.tolist()]
    for i, j in links:
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    roots = [root(i) for i in range(size)]
    best: dict[int, int] = {}
    for code in torch.argsort(counts.cpu(), descending=True, stable=True).tolist():
        best.setdefault(roots[code], code)
    return torch.tensor([best[r] for r in roots], dtype=torch.long)
