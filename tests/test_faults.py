"""Faults with real processes and real signals: a training process killed with SIGKILL resumes to bit-identical
weights, and when one of two processes stops answering the other exits within ``train.dist_timeout_s``."""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import ROOT, TOKENIZER_TINY, env, free_port, run, script_cmd, weights

from dcar.config import load_config
from dcar.train import latest_checkpoint, read_metrics

# discrete stage with the GAN and EMA on: model, discriminator, two optimizers, EMA, the codebook's dead-code
# restarts (RNG) and a cosine LR schedule all have to come back exactly
KILL = [*TOKENIZER_TINY, "stage=discrete", "loss.gan_weight=0.5", "loss.disc_start=2", "train.ema_decay=0.9",
        "train.batch_size=4", "train.steps=16", "train.ckpt_every=2", "train.keep_last=2", "optim.warmup_steps=2",
        "model.quantizer.dead_code_steps=3"]


def _last_step(run_dir: Path) -> int:
    """The newest step in ``metrics.jsonl`` (0 before the first row)."""
    path = run_dir / "metrics.jsonl"
    steps = re.findall(r'^\{"step": (\d+)', path.read_text(), re.MULTILINE) if path.is_file() else []
    return max(map(int, steps), default=0)


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 180) -> int:
    """Poll ``metrics.jsonl`` until the run has logged ``step``; return the step seen."""
    deadline = time.monotonic() + timeout
    while (seen := _last_step(run_dir)) < step:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before step {step}:\n{err[-4000:]}")
        assert time.monotonic() < deadline, f"no step {step} after {timeout} s"
        time.sleep(0.01)
    return seen


def _kill_at_random_step(cmd: list[str], run_dir: Path, first: int, last: int) -> tuple[int, Path, str]:
    """Start ``cmd``, SIGKILL it once it has logged a random step in [first, last], check that it died without
    finishing, run ``cmd`` again (``resume=auto`` is the default) and check that it resumed from the newest
    checkpoint. Returns (step seen at the kill, that checkpoint, a note with the random seed for messages)."""
    seed = random.randrange(2**32)
    kill_at = random.Random(seed).randint(first, last)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = _wait_for_step(proc, run_dir, kill_at)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    note = f"killed at step {seen} (random seed {seed})"
    assert proc.returncode == -signal.SIGKILL, note
    assert not (run_dir / "final").exists(), f"the run finished before the kill; {note}"
    newest = latest_checkpoint(run_dir / "checkpoints")
    assert newest is not None, f"no checkpoint yet; {note}"
    resumed = run(cmd, cwd=ROOT)
    assert f"resumed from {newest} at step {int(newest.name[5:])}" in resumed.stderr, note
    return seen, newest, note


def _assert_same_files(a: Path, b: Path, names: list[str], note: str) -> None:
    for name in names:
        wa, wb = weights(a / name), weights(b / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), f"{name} differs; {note}"


TOY = ["train.batch_size=4", "train.steps=150", "train.ckpt_every=5", "train.keep_last=2", "train.ema_decay=0.9",
       "optim.lr=3e-3", "optim.schedule=cosine", "optim.warmup_steps=10", "train.log_every=1", "log.progress=false"]


def test_sigkill_at_random_step_then_resume_auto_is_exact(tmp_path):
    """The shared loop in a fast toy script: frequent checkpoints, so the kill often lands inside a save."""
    from accelerate import Accelerator
    from toy_train import ToyTrainer

    from dcar.config import TrainConfig

    killed, straight = tmp_path / "killed", tmp_path / "straight"
    cmd = [sys.executable, str(ROOT / "tests" / "toy_train.py"), *TOY, f"run.dir={killed}"]
    _, _, note = _kill_at_random_step(cmd, killed, 10, 130)
    ToyTrainer(load_config(TrainConfig, [*TOY, f"run.dir={straight}"]), accelerator=Accelerator(cpu=True)).fit()
    _assert_same_files(killed, straight, ["final/model.safetensors", "checkpoints/step_00000150/ema.safetensors"],
                       note)
    assert not list((killed / "checkpoints").glob(".tmp-*"))  # a save cut short is cleaned up by the next one
    assert read_metrics(killed / "metrics.jsonl")[-1] | {"steps_per_s": 0} == \
        read_metrics(straight / "metrics.jsonl")[-1] | {"steps_per_s": 0}


def test_save_cut_short_by_sigkill_is_never_resumed_and_cleaned_up(tmp_path):
    """A writer killed inside a save leaves ``.tmp-step_*-<pid>``: resume ignores it, the next save removes it
    (but not the folder of a writer that is still running)."""
    from torch import nn

    from dcar.train.checkpoint import save_checkpoint

    root = tmp_path / "checkpoints"
    writer = ("import os, pathlib, sys, time; d = pathlib.Path(sys.argv[1]) / f'.tmp-step_00000009-{os.getpid()}'; "
              "d.mkdir(parents=True); (d / 'model.safetensors').write_bytes(b'partial'); print('ready', flush=True); "
              "time.sleep(60)")
    with subprocess.Popen([sys.executable, "-c", writer, str(root)], stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout.readline().strip() == "ready"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    stale = root / f".tmp-step_00000009-{proc.pid}"
    busy = root / f".tmp-step_00000009-{os.getppid()}"  # a live process: maybe still writing
    busy.mkdir()
    assert stale.is_dir() and latest_checkpoint(root) is None
    save_checkpoint(root, 4, {"model": nn.Linear(2, 2)}, {}, keep_last=2)
    assert not stale.exists() and busy.is_dir()
    assert latest_checkpoint(root) == root / "step_00000004"


@pytest.mark.slow
def test_sigkill_tokenizer_with_gan_then_resume_auto_is_exact(tmp_path):
    from accelerate import Accelerator

    from dcar.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    killed = tmp_path / "killed"
    cmd = script_cmd("train_tokenizer.py", [*KILL, f"run.dir={killed}"])
    _, _, note = _kill_at_random_step(cmd, killed, 3, 13)  # after the first checkpoint, before the last step
    straight = tmp_path / "straight"
    trainer = TokenizerTrainer(load_config(TokenizerTrainConfig, [*KILL, f"run.dir={straight}"]),
                               accelerator=Accelerator(cpu=True), argv=["test"])
    trainer.fit()
    rows = read_metrics(straight / "metrics.jsonl")
    assert "disc/d_loss" in rows[-1] and sum(r["vq/restarted"] > 0 for r in rows) > 0  # GAN and restarts ran
    _assert_same_files(killed, straight, ["final/model.safetensors", *(
        f"checkpoints/step_00000016/{name}.safetensors" for name in ("model", "ema", "disc"))], note)
    assert read_metrics(killed / "metrics.jsonl")[-1] | {"steps_per_s": 0} == rows[-1] | {"steps_per_s": 0}


def _launch_rank(rank: int, port: int, args: list[str]) -> subprocess.Popen:
    """One process of a 2-process group, started without a launcher (like one node of two): nothing but the
    process group notices when the peer goes away. The toy trainer runs the shared loop and starts fast."""
    rank_env = env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "toy_train.py"), *args], cwd=ROOT, env=rank_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", [
    pytest.param(signal.SIGSTOP, id="stalled"),  # alive but silent (hung, or a node that dropped off the network)
    pytest.param(signal.SIGKILL, id="killed", marks=pytest.mark.slow),  # gone: its sockets close
])
def test_other_rank_exits_with_clear_error_when_one_dies(tmp_path, sig):
    timeout_s = 8
    args = [f"run.dir={tmp_path / 'run'}", "train.batch_size=4", "train.steps=10000000", "train.ckpt_every=50",
            "train.log_every=10", "log.progress=false", f"train.dist_timeout_s={timeout_s}"]
    port = free_port()
    procs = [_launch_rank(r, port, args) for r in (0, 1)]
    try:
        _wait_for_step(procs[0], tmp_path / "run", 60)  # past the first checkpoint
        os.kill(procs[1].pid, sig)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=timeout_s + 90)  # TimeoutExpired here = the survivor hung
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode not in (0, None)
    assert "LostProcesses: process 0 of 2 lost contact with the others at step" in err
    assert f"train.dist_timeout_s={timeout_s} s" in err and "restart the whole job with resume=auto" in err
    assert "Newest checkpoint: " + str(tmp_path / "run" / "checkpoints" / "step_") in err
    if sig == signal.SIGSTOP:  # nothing closes the connection: only the timeout ends the wait
        assert timeout_s * 0.5 < elapsed < timeout_s + 60, elapsed
    else:
        assert elapsed < 60, elapsed
