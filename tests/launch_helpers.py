"""Helpers for tests that run the training scripts as real processes (multi-process launches, signals)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"

# A tiny DC-HT: no BatchNorm in the decoder, so a step depends on the global batch only, not on how it is split
# over processes (BatchNorm statistics are per process).
TOKENIZER_TINY = [
    f"config={ROOT}/configs/tokenizer/shapes.yaml",
    "model.encoder_block_out_channels=[8,8,16,32,32,32]", "model.decoder_block_out_channels=[8,8,16,32,32,32]",
    "model.encoder_layers_per_block=[0,1,1,1,1,1]", "model.decoder_layers_per_block=[0,1,1,1,1,1]",
    "model.decoder_norm_types=[rms_norm,rms_norm,rms_norm,rms_norm,rms_norm,rms_norm]",
    "model.quantizer.codebook_size=64", "data.resolution=64", "train.log_every=1", "log.progress=false",
    "optim.warmup_steps=0", "num_preview=2", "codebook_init_images=64",
]


def env(**extra: str) -> dict[str, str]:
    """The test environment for a child process: one thread (bit-reproducible, the machine is small), offline."""
    out = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "HF_HUB_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return {**out, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script_cmd(script: str, args: list[str]) -> list[str]:
    """``python scripts/<script> args`` (one process)."""
    return [sys.executable, str(SCRIPTS / script), *args]


def torchrun_cmd(script: str, args: list[str], nproc: int = 2) -> list[str]:
    """``torchrun --standalone --nproc_per_node N scripts/<script> args`` (gloo on CPU)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(SCRIPTS / script), *args]


def accelerate_cmd(script: str, args: list[str], nproc: int = 2) -> list[str]:
    """``accelerate launch --multi_gpu --num_processes N scripts/<script> args`` (without GPUs: gloo on CPU)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", f"--main_process_port={free_port()}",
            str(SCRIPTS / script), *args]


def run(cmd: list[str], cwd: Path, timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion; fail the test with its output if it fails."""
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())
