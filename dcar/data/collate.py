"""Batch collation that tolerates skipped samples.

Readers return ``None`` for an unreadable sample (after logging its path); :func:`collate` drops those, stacks
tensors, keeps everything else as lists, and reports how many were dropped in ``batch["num_skipped"]`` so the
training loop can count them across workers.
"""

from __future__ import annotations

from typing import Any

import torch


def collate(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack tensor fields, list the others, drop ``None`` samples and count them in ``num_skipped``."""
    kept = [s for s in samples if s is not None]
    batch: dict[str, Any] = {"num_skipped": len(samples) - len(kept)}
    if not kept:
        return batch
    for key in kept[0]:
        values = [s[key] for s in kept]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (int, float)) and not isinstance(values[0], bool):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
