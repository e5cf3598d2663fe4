"""Flushing subnormal floats to zero on CPU for a block of work (``train.flush_denormal``).

x86 CPUs handle subnormal operands (|x| < 1.2e-38 in float32) in microcode, ~100x slower than normal ones. Late in
training, optimizer moments and tiny activations become subnormal; torch exposes the FTZ/DAZ flags through
``torch.set_flush_denormal`` but no getter, so :func:`denormals_flushed` reads the mode back from arithmetic.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_SUBNORMAL = 1e-40  # a float32 subnormal: read as zero once denormals-are-zero is on


def denormals_flushed() -> bool:
    """Whether CPU float arithmetic currently flushes subnormals to zero."""
    return float(torch.tensor([_SUBNORMAL], dtype=torch.float32).mul(1.0)) == 0.0


@contextlib.contextmanager
def flush_denormal(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormals to zero inside the block when ``enabled`` (and the CPU supports it), then restore the
    previous mode; yields whether flushing is on inside the block."""
    before = denormals_flushed()
    if not enabled or before:
        yield before
        return
    active = torch.set_flush_denormal(True)  # False where the CPU has no FTZ/DAZ (non-SSE3): nothing changed
    try:
        yield active
    finally:
        if active:
            torch.set_flush_denormal(False)
