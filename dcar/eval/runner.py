"""Plumbing shared by the evaluation commands: process sharding, resumable per-chunk results, atomic files.

The evaluations (rFID, MJHQ, GenEval, ShapesEval) share one version of each helper: the process context
(:func:`dist_context`: rank, world size, device, barriers, :meth:`DistContext.gather`), the round-robin share of a
process (:func:`my_share`, :func:`map_share`), files written atomically (:func:`atomic_write_bytes` and the JSON /
``.npz`` / image variants, defined in :mod:`dcar.utils.atomic` and re-exported here), the settings guard of a
resumable output folder (:func:`check_settings`) and file hashes (:func:`sha256_file`, :func:`fingerprint`).

An evaluation splits its N items into fixed **chunks** (``chunk_size`` items each, independent of the number of
processes). Under ``accelerate launch`` / ``torchrun`` every process takes a disjoint set of chunks (chunk ``c``
goes to process ``c % world``); each finished chunk is saved atomically as ``<work_dir>/part-<c>.npz``. A rerun
skips every chunk whose part file exists and holds the keys it needs, so an interrupted evaluation resumes where it
stopped, with any number of processes, and produces the same numbers (chunk contents do not depend on the world
size). After a barrier the main process loads all parts in chunk order and reduces them.

``<work_dir>/meta.json`` records what the parts were computed with (model fingerprint, data, resolution, feature
extractor, ...); a mismatch on rerun is an error rather than a silent mix of two models' results.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dcar.config.loader import ConfigError
from dcar.utils.atomic import atomic_save_image, atomic_savez, atomic_write_bytes, atomic_write_json


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """All arrays of an ``.npz`` file, or None when it is missing or unreadable (e.g. cut short)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError):
        return None


def fingerprint(path: str | os.PathLike) -> str:
    """A short content fingerprint of a model file or folder (recursive).

    Small text files (``.json``, ``.yaml``, ``.txt``, ``.model``) are hashed by content, others (weights) by name
    and size, so copying a checkpoint keeps its fingerprint while a different config or weight file changes it.
    """
    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for p in files:
        rel = p.name if p == root else p.relative_to(root).as_posix()
        h.update(rel.encode())
        if p.suffix in (".json", ".yaml", ".yml", ".txt", ".model") and p.stat().st_size < (1 << 24):
            h.update(p.read_bytes())
        else:
            h.update(str(p.stat().st_size).encode())
    return h.hexdigest()[:16]


def optional_fingerprint(path: str | os.PathLike | None) -> str | None:
    """:func:`fingerprint` of an existing file or folder; None for an empty or missing path (e.g. a pipeline object
    given in Python, or only scoring images already on disk)."""
    return fingerprint(path) if path and Path(path).exists() else None


def inference_record(settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{"inference": settings}`` for the settings file and the result JSON of an evaluation whose pipeline runs
    with non-default :class:`~dcar.inference.InferenceConfig` settings; ``{}`` for the defaults (so work folders
    made before the setting existed still match)."""
    return {"inference": dict(settings)} if settings else {}


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (e.g. the exact prompt metadata an evaluation used)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def environment() -> dict[str, Any]:
    """Versions of what the numbers were measured with (dcar, torch, torch-fidelity, torchmetrics, python)."""
    import torch

    import dcar

    out: dict[str, Any] = {"dcar": dcar.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for dist in ("torch-fidelity", "torchmetrics", "torchvision", "transformers", "accelerate", "scipy"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    out["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return out


@dataclass
class DistContext:
    """The current process's place in an ``accelerate`` / ``torchrun`` launch (a single process otherwise)."""

    rank: int
    world: int
    device: Any
    state: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every process (no-op for one process)."""
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()

    def gather(self, items: Sequence[Any]) -> list[Any]:
        """The concatenation, in rank order, of every process's ``items`` (picklable objects), on every process.
        A single process (or a context without an accelerate state) gets its own items back."""
        if self.state is None or self.world == 1:
            return list(items)
        from accelerate.utils import gather_object

        return list(gather_object(list(items)))

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Run the body on the main process first (downloads, cache files), then on the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


def dist_context(device: str = "auto") -> DistContext:
    """The process context from accelerate's ``PartialState`` (``device``: ``auto``, ``cpu`` or e.g. ``cuda:0``).

    ``auto`` is the GPU of the process under ``accelerate launch`` / ``torchrun``, or gloo CPU processes when CUDA is
    absent or ``ACCELERATE_USE_CPU`` is set (``accelerate launch --cpu``)."""
    import torch
    from accelerate import PartialState

    # accelerate ignores a CPU-only torchrun/accelerate launch unless cpu=True, so "auto" without CUDA means cpu
    use_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    cpu = device == "cpu" or (device == "auto" and (use_cpu or not torch.cuda.is_available()))
    state = PartialState(cpu=cpu)
    dev = state.device if device in ("auto", "cpu") else torch.device(device)
    if state.num_processes > 1 and device not in ("auto", "cpu"):
        raise ValueError(f"device={device!r} with {state.num_processes} processes; use device=auto")
    return DistContext(rank=state.process_index, world=state.num_processes, device=dev, state=state)


def chunk_ranges(n: int, chunk_size: int) -> list[range]:
    """``[0, n)`` cut into consecutive ranges of ``chunk_size`` (the last one shorter)."""
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    return [range(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def my_share(num: int, ctx: DistContext) -> list[int]:
    """The indices in ``range(num)`` this process handles (round robin, disjoint across processes)."""
    return list(range(ctx.rank, num, ctx.world))


def map_share(ctx: DistContext, items: Sequence[Any], fn: Callable[[Any], Any], desc: str = "eval",
              progress: bool = True) -> list[Any]:
    """``fn`` over this process's share of ``items`` (:func:`my_share`), gathered from every process (rank order,
    not item order: sort the result); progress (tqdm, main process) counts items."""
    from tqdm.auto import tqdm

    mine = [items[i] for i in my_share(len(items), ctx)]
    return ctx.gather([fn(x) for x in tqdm(mine, desc=desc, unit="img", disable=not (progress and ctx.is_main))])


def check_settings(ctx: DistContext, path: str | os.PathLike, settings: Mapping[str, Any],
                   holds: str = "partial results") -> dict[str, Any]:
    """Guard of a resumable output folder: the main process records ``settings`` at ``path`` (JSON, atomically)
    unless an earlier run did; then every process checks that the recorded settings are the same and raises
    :class:`ConfigError` naming the keys that differ (so results of two setups are never mixed)."""
    path = Path(path)
    settings = json.loads(json.dumps(dict(settings)))  # normalise (tuples -> lists) for the comparison
    if ctx.is_main and not path.is_file():
        atomic_write_json(path, settings)
    ctx.barrier()
    saved = json.loads(path.read_text())
    if saved != settings:
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise ConfigError(f"{path.parent} holds {holds} computed with different settings ({', '.join(diff)}); "
                          f"use another output location or delete {path.parent}")
    return settings


def prepare_work_dir(ctx: DistContext, work_dir: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Create ``work_dir`` and its ``meta.json``; raise :class:`ConfigError` if it holds results of another setup."""
    work = Path(work_dir)
    if ctx.is_main:
        work.mkdir(parents=True, exist_ok=True)
    check_settings(ctx, work / "meta.json", meta)
    return work


def part_path(work_dir: str | os.PathLike, index: int) -> Path:
    return Path(work_dir) / f"part-{index:05d}.npz"


def valid_part(path: Path, required: Sequence[str]) -> dict[str, np.ndarray] | None:
    """The arrays of a part file if it exists, is readable and has every ``required`` key; else None."""
    part = load_npz(path) if path.is_file() else None
    if part is None or any(k not in part for k in required):
        return None
    return part


def run_chunks(
    ctx: DistContext,
    work_dir: str | os.PathLike,
    chunks: Sequence[Sequence[int]],
    compute: Callable[[Sequence[int]], dict[str, np.ndarray]],
    required: Sequence[str],
    desc: str = "eval",
    progress: bool = True,
) -> int:
    """Compute and save this process's missing chunks, then wait for all processes; returns the chunks computed.

    ``compute(items)`` returns the arrays of one chunk (per-item arrays first-axis aligned with its kept items, or
    per-chunk sums); they are saved atomically as ``part-<c>.npz``. Progress (tqdm, main process) counts items.
    """
    from tqdm.auto import tqdm

    mine = [c for c in my_share(len(chunks), ctx) if valid_part(part_path(work_dir, c), required) is None]
    total = sum(len(chunks[c]) for c in mine)
    done = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not (progress and ctx.is_main)) as bar:
        for c in mine:
            arrays = compute(chunks[c])
            atomic_savez(part_path(work_dir, c), **arrays)
            bar.update(len(chunks[c]))
            done += 1
    ctx.barrier()
    return done


def load_parts(work_dir: str | os.PathLike, num_chunks: int, required: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Every part in chunk order (main process, after :func:`run_chunks`); a missing part is an error."""
    parts = []
    for c in range(num_chunks):
        part = valid_part(part_path(work_dir, c), required)
        if part is None:
            raise RuntimeError(f"{part_path(work_dir, c)} is missing or incomplete after all processes finished")
        parts.append(part)
    return parts


def concat(parts: Sequence[dict[str, np.ndarray]], key: str) -> np.ndarray:
    """Per-item arrays of ``key`` from all parts, concatenated along the first axis (empty parts are skipped)."""
    arrays = [p[key] for p in parts if p[key].size]
    return np.concatenate(arrays, axis=0) if arrays else np.zeros((0,))


class IndexedImages:
    """Map-style view of ``dataset`` restricted to ``indices``: ``{"image", "index"}`` samples (None kept as None).

    ``dataset[i]`` must return a dict with an ``"image"`` tensor, or None for an unreadable file.
    """

    def __init__(self, dataset: Any, indices: Sequence[int]) -> None:
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        sample = self.dataset[self.indices[i]]
        return None if sample is None else {"image": sample["image"], "index": self.indices[i]}


__all__ = [
    "DistContext", "IndexedImages", "atomic_save_image", "atomic_savez", "atomic_write_bytes", "atomic_write_json",
    "check_settings", "chunk_ranges", "concat", "dist_context", "environment", "fingerprint", "load_npz", "load_parts",
    "map_share", "my_share", "optional_fingerprint", "part_path", "prepare_work_dir", "run_chunks", "sha256_file",
    "valid_part",
]
