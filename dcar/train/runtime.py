"""The per-process runtime of a training run: seeds and RNG states (exact resume), accelerate's ``Accelerator`` and
the check that a multi-process launch formed one process group."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import numpy as np
import torch

from dcar.config.schema import TrainConfig

__all__ = ["build_accelerator", "check_process_group", "compile_for_training", "launched_world_size", "rng_state",
           "retained_graph_compile", "seed_everything", "set_rng_state", "step_seed"]


def step_seed(seed: int, rank: int, step: int) -> int:
    """The seed of one (rank, step): independent streams, stable across resumes."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain containers (loadable with ``weights_only=True``)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE`` from torchrun / accelerate launch / SLURM + torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def build_accelerator(cfg: TrainConfig) -> Any:
    """accelerate's ``Accelerator`` for ``cfg``: precision, trackers, and the process-group timeout.

    A multi-process launch without CUDA gets ``cpu=True``: accelerate otherwise ignores it on a CPU-only machine and
    every process trains alone (all writing the same run directory); with it, the processes form a gloo group.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.train.dist_timeout_s))
    cpu = launched_world_size() > 1 and not torch.cuda.is_available()
    return Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu,
                       log_with="wandb" if cfg.log.wandb != "disabled" else None, kwargs_handlers=[timeout])


def check_process_group(accelerator: Any) -> None:
    """Refuse to train when the launcher started several processes but they did not form one process group."""
    launched = launched_world_size()
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate formed a group of "
            f"{accelerator.num_processes}: each process would train alone and overwrite the same run.dir. "
            "Pass Accelerator(cpu=True) on machines without a GPU.")


def compile_for_training(module: torch.nn.Module, mode: str = "default", backend: str = "inductor") -> torch.nn.Module:
    """``torch.compile`` a training step as ``train.compile`` does: static shapes, because a symbolic batch size
    (dynamo's automatic dynamic shapes once a second batch size is seen) breaks the mask sampling's ``torch.rand``."""
    return torch.compile(module, mode=mode, backend=backend, dynamic=False)


@contextmanager
def retained_graph_compile(enabled: bool = True) -> Iterator[None]:
    """torch.compile settings for a step that runs backward through one compiled graph more than once.

    The tokenizer's adaptive GAN weight takes ``torch.autograd.grad(..., retain_graph=True)`` of two losses before
    the step's backward. With torch's defaults, AOTAutograd refuses (donated buffers require ``retain_graph=False``)
    and inductor's backward writes into buffers it takes as dead (``inplace_buffers``), so the second pass reads
    overwritten activations: measured on a tiny DC-HT with the GAN on (CPU, torch 2.14), the GAN loss's gradient at
    the decoder's last conv came out 6.5e-6 instead of 4.16, the adaptive weight hit its clamp and the loss
    diverged at the first GAN step. Both settings are read when the graphs compile (the backward's at its first
    call), so this wraps the training loop; the previous values come back on exit.
    """
    if not enabled:
        yield
        return
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with functorch_config.patch(donated_buffer=False), inductor_config.patch(inplace_buffers=False):
        yield
