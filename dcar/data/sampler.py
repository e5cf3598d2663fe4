"""A resumable, rank-sharded batch sampler: the data position is part of the training state.

The global sample stream is the concatenation of per-epoch permutations (``torch.randperm`` seeded by
``seed + epoch``; no shuffling gives ``0..n-1`` each epoch). Global batch ``s`` is the slice
``[s * B, (s + 1) * B)`` of that stream with ``B = batch_size * world_size``, and rank ``r`` takes its ``r``-th
sub-slice of ``batch_size``. Hence:

* a run resumed at step ``s`` (``start_step=s``) sees exactly the batches an uninterrupted run would have seen;
* ``world_size`` processes with batch ``b`` see the same global batches as one process with batch ``world * b``;
* ranks never duplicate or miss a sample: each epoch of the global stream is one permutation, split over the ranks
  (cf. VAR's ``DistInfiniteBatchSampler``); a global batch that straddles two epochs may hold a sample of each.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Infinite batch sampler whose position is the number of global batches already consumed."""

    def __init__(
        self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, rank: int = 0,
        world_size: int = 1, start_step: int = 0,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world size {world_size}")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.shuffle, self.rank, self.world_size = seed, shuffle, rank, world_size
        self.start_step = start_step
        self._cached: tuple[int, torch.Tensor] | None = None

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            order = (torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
                     if self.shuffle else torch.arange(self.num_samples))
            self._cached = (epoch, order)
        return self._cached[1]

    def global_indices(self, start: int, count: int) -> list[int]:
        """``count`` entries of the global stream starting at position ``start``."""
        out: list[int] = []
        epoch, offset = divmod(start, self.num_samples)
        while len(out) < count:
            order = self._epoch_order(epoch)
            take = order[offset : offset + count - len(out)]
            out.extend(take.tolist())
            epoch, offset = epoch + 1, 0
        return out

    def batch_at(self, step: int) -> list[int]:
        """This rank's indices for global step ``step``."""
        global_batch = self.batch_size * self.world_size
        indices = self.global_indices(step * global_batch, global_batch)
        return indices[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.start_step
        while True:
            yield self.batch_at(step)
            step += 1

    def __len__(self) -> int:  # an infinite sampler; report one epoch of this rank's batches for progress bars
        return max(1, self.num_samples // (self.batch_size * self.world_size))
