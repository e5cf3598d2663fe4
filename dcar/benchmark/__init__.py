"""Latency, throughput, FLOPs and fraction of the matmul ceiling of DC-AR text-to-image, plus training throughput.

``python scripts/benchmark.py [preset=paper|cpu-mid|tiny] [key=value ...]``; see :mod:`dcar.benchmark.run` for
what is measured and in which order, :mod:`dcar.benchmark.config` for the keys.
"""

from .config import BenchmarkConfig, load_benchmark_config
from .phases import PHASES, Sampling, phased_call, transformer_phase
from .report import format_report
from .run import build_pipeline, count_flops, run_benchmark
from .timing import flop_counter, matmul_rate

__all__ = [
    "PHASES", "BenchmarkConfig", "Sampling", "build_pipeline", "count_flops", "flop_counter", "format_report",
    "load_benchmark_config", "matmul_rate", "phased_call", "run_benchmark", "transformer_phase",
]
