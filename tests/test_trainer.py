"""The shared training loop: exact resume, NaN policy, run-directory contents, data position."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from dcar.config import TrainConfig, load_config
from dcar.data.sampler import ResumableBatchSampler
from dcar.train import Trainer, TrainingAborted, latest_checkpoint, read_metrics
from dcar.train.checkpoint import list_checkpoints, load_checkpoint


class Vectors(Dataset):
    def __len__(self) -> int:
        return 37

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"x": torch.randn(6, generator=g), "index": i}


class Crash(Exception):
    pass


class ToyTrainer(Trainer):
    """Regress x -> 2x with dropout (uses the RNG) and BatchNorm (has buffers)."""

    crash_at: int | None = None
    nan_at: frozenset[int] = frozenset()

    def build_modules(self):
        return {"model": nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 6))}

    def build_dataset(self):
        return Vectors()

    def train_step(self, batch, step):
        if step == self.crash_at:
            raise Crash(step)
        x = batch["x"]
        loss = (self.modules["model"](x) - 2 * x).pow(2).mean()
        if step in self.nan_at:
            loss = loss * float("nan")
        self.optimize("model", loss)
        self.seen = getattr(self, "seen", []) + [batch["index"].tolist()]
        return {"loss": loss.item()}


def _cfg(run_dir, **train) -> TrainConfig:
    cfg = load_config(TrainConfig, [f"run.dir={run_dir}", "optim.lr=0.01", "optim.schedule=cosine",
                                    "optim.warmup_steps=2", "train.batch_size=5", "train.ema_decay=0.9",
                                    "train.log_every=1", "log.progress=false", "data.seed=4"])
    return replace(cfg, train=replace(cfg.train, **train))


def _run(cfg, **attrs) -> ToyTrainer:
    from accelerate import Accelerator

    trainer = ToyTrainer(cfg, accelerator=Accelerator(cpu=True), argv=["test"])
    for k, v in attrs.items():
        setattr(trainer, k, v)
    trainer.fit()
    return trainer


def _weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_interrupted_and_resumed_equals_straight(tmp_path):
    straight = _run(_cfg(tmp_path / "a", steps=8, ckpt_every=3))
    with pytest.raises(Crash):
        _run(_cfg(tmp_path / "b", steps=8, ckpt_every=3), crash_at=5)
    assert latest_checkpoint(tmp_path / "b" / "checkpoints").name == "step_00000003"
    resumed = _run(_cfg(tmp_path / "b", steps=8, ckpt_every=3))
    # the resumed run saw exactly the batches the straight run saw from step 3 on
    assert resumed.seen == straight.seen[3:]
    for name in ("model", "ema"):
        a = _weights(tmp_path / "a" / "checkpoints" / "step_00000008" / f"{name}.safetensors")
        b = _weights(tmp_path / "b" / "checkpoints" / "step_00000008" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    sa, _ = load_checkpoint(tmp_path / "a" / "checkpoints" / "step_00000008", straight.checkpoint_modules())
    sb, _ = load_checkpoint(tmp_path / "b" / "checkpoints" / "step_00000008", resumed.checkpoint_modules())
    assert sa["schedulers"] == sb["schedulers"]
    exp_a = sa["optimizers"]["model"]["state"][0]["exp_avg"]
    assert torch.equal(exp_a, sb["optimizers"]["model"]["state"][0]["exp_avg"])
    # final/ holds the EMA weights in safetensors
    final = _weights(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(final[k], v) for k, v in _weights(
        tmp_path / "b" / "checkpoints" / "step_00000008" / "ema.safetensors").items())


def test_training_reduces_loss_and_writes_run_dir(tmp_path):
    cfg = replace(_cfg(tmp_path, steps=30, ckpt_every=10, keep_last=2), seed=1)
    cfg = replace(cfg, optim=replace(cfg.optim, lr=0.03, schedule="constant"))
    _run(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert sum(r["loss"] for r in rows[-5:]) < 0.5 * sum(r["loss"] for r in rows[:5])
    assert {"lr", "steps_per_s", "bad_steps", "grad_norm/model"} <= rows[-1].keys()
    assert "seed: 1" in (tmp_path / "config.yaml").read_text()
    assert (tmp_path / "command.txt").read_text().strip().endswith("test")
    launch = json.loads((tmp_path / "launches.jsonl").read_text().splitlines()[0])
    assert {"commit", "dirty", "dcar", "torch", "command"} <= launch.keys()
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000020", "step_00000030"]


def test_nan_step_is_skipped_and_counted(tmp_path):
    trainer = _run(_cfg(tmp_path, steps=6, ckpt_every=3), nan_at=frozenset({1, 2}))
    assert trainer.bad_steps == 2
    meta = json.loads((tmp_path / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["bad_steps"] == 2
    for t in _weights(tmp_path / "checkpoints" / "step_00000006" / "model.safetensors").values():
        assert torch.isfinite(t).all()


def test_too_many_bad_steps_abort_with_clear_message(tmp_path):
    with pytest.raises(TrainingAborted, match=r"3 consecutive steps with a non-finite loss"):
        _run(_cfg(tmp_path, steps=10, ckpt_every=2, max_bad_steps=3), nan_at=frozenset(range(3, 10)))
    # the last checkpoint predates the NaNs and is finite
    last = latest_checkpoint(tmp_path / "checkpoints")
    assert last.name == "step_00000004"  # step 3 was bad but skipped: the weights at step 4 are still finite
    for t in _weights(last / "model.safetensors").values():
        assert torch.isfinite(t).all()


def test_sampler_resume_and_rank_sharding():
    one = ResumableBatchSampler(23, 8, seed=3)
    stream = [one.batch_at(s) for s in range(10)]
    resumed = ResumableBatchSampler(23, 8, seed=3, start_step=4)
    it = iter(resumed)
    assert [next(it) for _ in range(6)] == stream[4:]
    ranks = [ResumableBatchSampler(23, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for s in range(10):
        assert ranks[0].batch_at(s) + ranks[1].batch_at(s) == stream[s]  # 2 x 4 == 1 x 8
    flat = [i for b in stream for i in b][:69]  # 3 epochs of 23: each epoch a permutation
    for e in range(3):
        assert sorted(flat[23 * e: 23 * (e + 1)]) == list(range(23))
    assert flat[:23] != list(range(23))
    assert ResumableBatchSampler(5, 2, shuffle=False).global_indices(0, 7) == [0, 1, 2, 3, 4, 0, 1]


class LinearToy(ToyTrainer):
    """No BatchNorm / dropout: the update depends only on the mean gradient over the global batch."""

    def build_modules(self):
        return {"model": nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 6))}


def test_gradient_accumulation_equals_the_large_batch(tmp_path):
    from accelerate import Accelerator

    runs = {}
    for name, bs, accum in (("big", 10, 1), ("accum", 5, 2)):
        cfg = _cfg(tmp_path / name, steps=5, ckpt_every=5, batch_size=bs, grad_accum=accum, ema_decay=0.0)
        trainer = LinearToy(cfg, accelerator=Accelerator(cpu=True), argv=["test"])
        trainer.fit()
        runs[name] = trainer
    # the same samples per optimizer step: two micro-batches of 5 == one batch of 10
    big = [sorted(b) for b in runs["big"].seen]
    acc = [sorted(a + b) for a, b in zip(runs["accum"].seen[::2], runs["accum"].seen[1::2], strict=True)]
    assert big == acc
    a = _weights(tmp_path / "big" / "final" / "model.safetensors")
    b = _weights(tmp_path / "accum" / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    meta = json.loads((tmp_path / "accum" / "checkpoints" / "step_00000005" / "meta.json").read_text())
    assert meta["samples_seen"] == 50


class DenormalProbe(ToyTrainer):
    """Records, at every step, whether a float32 subnormal survives arithmetic."""

    def train_step(self, batch, step):
        self.flushed = getattr(self, "flushed", []) + [float(torch.tensor([1e-40]) * 1.0) == 0.0]
        return super().train_step(batch, step)


@pytest.mark.parametrize("enabled", [True, False])
def test_flush_denormal_holds_inside_fit_and_is_restored(tmp_path, enabled):
    from accelerate import Accelerator

    from dcar.utils.denormal import denormals_flushed

    assert not denormals_flushed()
    trainer = DenormalProbe(_cfg(tmp_path, steps=3, flush_denormal=enabled), accelerator=Accelerator(cpu=True),
                            argv=["test"])
    trainer.fit()
    assert trainer.flushed == [enabled] * 3
    assert not denormals_flushed()  # the process-wide mode is back to what it was
    assert float(torch.tensor([1e-40]) * 1.0) > 0.0


def test_flush_denormal_leaves_a_mode_set_by_the_caller():
    from dcar.utils.denormal import denormals_flushed, flush_denormal

    torch.set_flush_denormal(True)
    try:
        with flush_denormal(True) as active:
            assert active and denormals_flushed()
        assert denormals_flushed()  # the caller's setting survives the block
    finally:
        torch.set_flush_denormal(False)
    with flush_denormal(False) as active:
        assert not active and not denormals_flushed()


def test_train_module_names_its_commands():
    from dcar.config.loader import ConfigError
    from dcar.train.cli import COMMANDS, main

    assert set(COMMANDS) == {"tokenizer", "generator"}
    with pytest.raises(ConfigError, match="COMMAND must be one of tokenizer, generator; got 'tokeniser'"):
        main(["tokeniser", "stage=warmup"])
    with pytest.raises(ConfigError, match="got nothing"):
        main([])
