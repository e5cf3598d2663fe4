"""Timing, FLOP counting, matmul-rate and memory helpers for ``dcar.benchmark``.

* :func:`time_calls`: warm-up calls, then timed repeats, each bracketed by a device synchronisation
  (``torch.cuda.synchronize`` on a GPU); statistics with the median first (EVAL_PROTOCOLS 4.3 asks for the mean,
  which is reported too; the median is what the summary uses, as it resists the stragglers of a shared machine).
  :func:`time_interleaved` does the same for several functions in round-robin (A/B comparisons).
* :func:`flop_counter`: ``torch.utils.flop_counter.FlopCounterMode`` plus formulas for the CPU's fused attention
  kernels (``_scaled_dot_product_flash_attention_for_cpu`` and its backward), which the stock registry lacks, so
  a CPU count equals a GPU count of the same call. FLOPs are those of matmuls, convolutions and attention
  (2 per multiply-add); elementwise work, norms and sampling are not counted.
* :func:`matmul_rate`: the dense GEMM rate of the device in a dtype (square ``n x n @ n x n``, median of repeats):
  the ceiling that ``fraction_of_peak`` divides by.
* :func:`keep_freed_memory`: glibc ``mallopt`` so that freed blocks stay in the heap instead of going back to the
  kernel; large CPU tensors are then reused without fresh page faults.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["cpu_name", "device_name", "flop_counter", "keep_freed_memory", "matmul_rate", "peak_memory",
           "reset_peak_memory", "stats", "sync", "time_calls", "time_interleaved"]


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(seconds: list[float]) -> dict[str, Any]:
    """``median``, ``mean``, ``min``, ``max`` (seconds) and ``n`` of timed repeats."""
    return {"median": statistics.median(seconds), "mean": statistics.fmean(seconds), "min": min(seconds),
            "max": max(seconds), "n": len(seconds)}


def time_calls(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> dict[str, Any]:
    """``warmup`` untimed calls, then ``repeats`` timed ones (synchronised before and after each)."""
    return time_interleaved({"fn": fn}, device, warmup, repeats)["fn"]


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int,
                     repeats: int) -> dict[str, dict[str, Any]]:
    """:func:`time_calls` for several functions in round-robin (``warmup`` untimed rounds, then ``repeats`` timed
    ones, each call synchronised before and after), so that a load change on a shared machine hits each alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            seconds[name].append(time.perf_counter() - start)
    return {name: {**stats(s), "warmup": warmup, "all": s} for name, s in seconds.items()}


# ---- FLOPs ------------------------------------------------------------------------------------------------------


def _cpu_sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_formulas() -> dict[Any, Callable]:
    aten = torch.ops.aten
    out: dict[Any, Callable] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        out[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        out[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return out


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts the CPU fused-attention kernels (use as a context manager;
    ``.get_total_flops()`` afterwards)."""
    return FlopCounterMode(display=False, custom_mapping=_extra_formulas())


# ---- device ceiling ---------------------------------------------------------------------------------------------


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int = 0, repeats: int = 20,
                warmup: int = 3) -> dict[str, Any]:
    """Dense GEMM FLOP/s of ``size x size`` matrices in ``dtype`` (0: 8192 on GPU, 2048 on CPU), median of repeats."""
    n = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    out = torch.empty(n, n, device=device, dtype=dtype)
    timing = time_calls(lambda: torch.mm(a, b, out=out), device, warmup, repeats)
    flops = 2 * n**3
    return {"flops_per_s": flops / timing["median"], "best_flops_per_s": flops / timing["min"], "size": n,
            "dtype": str(dtype).replace("torch.", ""), "seconds": {k: v for k, v in timing.items() if k != "all"}}


# ---- memory -----------------------------------------------------------------------------------------------------


def reset_peak_memory(device: torch.device) -> None:
    """Restart the GPU's peak-allocation counter (CPU: the process peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict[str, Any]:
    """GPU: ``torch.cuda.max_memory_allocated`` since the last reset; CPU: the process's peak RSS so far."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "torch.cuda.max_memory_allocated"}
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    scale = 1 if platform.system() == "Darwin" else 1024
    return {"bytes": int(kib * scale), "kind": "peak RSS of the process (getrusage ru_maxrss)"}


def keep_freed_memory() -> bool:
    """glibc only: serve every allocation from the heap (``M_MMAP_MAX = 0``) and (almost) never trim it
    (``M_TRIM_THRESHOLD = 2^31 - 1``), so reused tensor buffers skip the kernel's page faults. The process keeps
    its peak heap. Returns False where glibc's ``mallopt`` is unavailable."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1
    return bool(ok and libc.mallopt(m_trim_threshold, 2**31 - 1) == 1)


# ---- names ------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo`` on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """GPU name (``torch.cuda.get_device_name``) or the CPU model with its logical core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} logical cores)"
