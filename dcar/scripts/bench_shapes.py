"""Print shapes-dataset generation speed (samples/s, one process) at 64, 128 and 256 px.

Usage: ``python scripts/bench_shapes.py [--seconds 2] [--resolutions 64 128 256]``. Each sample is a full
``ShapesDataset.__getitem__`` (scene sampling, rendering, float tensor in [-1, 1], scene dict).
"""

from __future__ import annotations

import argparse
import time

import torch

from dcar.data.shapes import ShapesDataset


def bench(resolution: int, seconds: float) -> float:
    """Samples per second of ``ShapesDataset(resolution=resolution)[i]`` over about ``seconds`` seconds."""
    ds = ShapesDataset(resolution=resolution, size=10**9)
    for i in range(20):  # warm-up
        ds[i]
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        for _ in range(50):
            ds[n]
            n += 1
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    args = parser.parse_args()
    torch.set_num_threads(1)
    for r in args.resolutions:
        print(f"{r:4d} px: {bench(r, args.seconds):8.0f} samples/s")


if __name__ == "__main__":
    main()
