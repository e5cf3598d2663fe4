"""Benchmark DC-AR text-to-image sampling (latency, throughput, phases, FLOPs, fraction of the matmul ceiling)
and generator training throughput, on randomly initialised models.

    python scripts/benchmark.py                      # paper models (DC-HT f32c32 + DC-AR 512 px), GPU, bf16
    python scripts/benchmark.py preset=cpu-mid       # the CPU floor: 12 x 512 generator, 16 x 16 tokens, fp32
    python scripts/benchmark.py preset=tiny          # seconds (tests)
    python scripts/benchmark.py dtype=float16 ablate=true compile=true out=runs/benchmark/h100_fp16.json
    python scripts/benchmark.py compile=true compile_mode=reduce-overhead decoder_fuse_norms=true  # CUDA graphs
    python scripts/benchmark.py flops_only=true device=cpu dtype=float32   # paper FLOPs per image on a CPU

Prints a table and writes a JSON file (``out=``, default ``runs/benchmark/[<preset>_]<device>_<dtype>.json``).
Keys: :class:`dcar.benchmark.config.BenchmarkConfig`; ``model.*`` / ``tokenizer_model.*`` override single fields
of the generator / tokenizer YAML (``generator=``, ``tokenizer=``). A wrong key stops the script before anything
is built.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dcar.cli import run_cli


def main(argv: Sequence[str]) -> dict[str, Any]:
    from dcar.benchmark import format_report, load_benchmark_config, run_benchmark

    cfg = load_benchmark_config(argv)
    start = time.perf_counter()
    result = run_benchmark(cfg, log=lambda msg: print(f"[benchmark {time.perf_counter() - start:6.1f} s] {msg}",
                                                      flush=True))
    print(format_report(result))
    return result


if __name__ == "__main__":
    run_cli(main)
