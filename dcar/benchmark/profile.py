"""``profile=true``: one whole sampling call under ``torch.profiler``, its ops ranked by self device time, and (GPU)
one call under CUDA's synchronisation check.

The table (``torch.profiler`` key averages, sorted by self CUDA time on a GPU, self CPU time on a CPU) goes to
``<out>.profile.txt`` beside the JSON; the JSON gets the top ops with their share of the call's device time, the
place to look first when a phase is slower than its FLOPs say. :func:`host_syncs` counts the operations of a call
that make the CPU wait for the GPU (``torch.cuda.set_sync_debug_mode``), by the source line that issued them: a
sampling loop without them lets the CPU queue each step while the GPU runs the previous one.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from dcar.utils.atomic import atomic_write_text

from .timing import sync

__all__ = ["count_sync_warnings", "host_syncs", "profile_call"]


def profile_call(call: Callable[[], Any], device: torch.device, out: Path, top: int = 25) -> dict[str, Any]:
    """Run ``call`` once (already warm) under the profiler; write the table to ``out.with_suffix('.profile.txt')``
    and return ``{"sort_by", "total_us", "file", "top": [{name, self_us, share, calls}]}``."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    sync(device)
    with profile(activities=activities) as prof:
        call()
        sync(device)
    events = prof.key_averages()
    sort_by = "self_device_time_total" if gpu else "self_cpu_time_total"

    def self_us(e) -> float:
        return float(getattr(e, "self_device_time_total", 0.0) if gpu else e.self_cpu_time_total)

    total = sum(self_us(e) for e in events)
    ranked = sorted(events, key=self_us, reverse=True)[:top]
    path = out.with_suffix(".profile.txt")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, events.table(sort_by=sort_by, row_limit=60, max_name_column_width=80))
    return {"sort_by": sort_by, "total_us": total, "file": str(path),
            "top": [{"name": e.key, "self_us": self_us(e), "share": self_us(e) / total if total else 0.0,
                     "calls": int(e.count)} for e in ranked]}


SYNC_WARNING = "called a synchronizing CUDA operation"  # torch.cuda.set_sync_debug_mode("warn")'s message


def count_sync_warnings(call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call``, recording every warning; ``{"count", "where": {"file:line": n}}`` of the synchronisation ones."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    where = Counter(f"{w.filename}:{w.lineno}" for w in caught if SYNC_WARNING in str(w.message))
    return {"count": sum(where.values()), "where": dict(where.most_common())}


def host_syncs(call: Callable[[], Any], device: torch.device) -> dict[str, Any] | None:
    """The synchronising CUDA operations of one (warm) ``call`` by source line; None off the GPU."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return count_sync_warnings(call)
    finally:
        torch.cuda.set_sync_debug_mode("default")
