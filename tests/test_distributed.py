"""Scale-out on CPU with real processes (gloo): 2 processes x batch b train like 1 process x batch 2b, and the ranks
split the sample stream without duplicates or gaps, also across a resume.

The launches go through ``tests/trace_batches.py``, which runs the real script and records the sample indices each
rank consumed. Per-step reseeding is per (seed, rank, step), so the configs compared here have no randomness
inside a step: the tokenizer's warm-up stage without GAN (and without BatchNorm, whose statistics are per process);
the generator with every token masked (``train_mask_ratio_min`` close to 1), no caption dropout and no diffusion
head (the head's noise is drawn per rank), i.e. the whole discrete transformer is compared.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from launch_helpers import ROOT, TOKENIZER_TINY, accelerate_cmd, max_abs_diff, run, torchrun_cmd, weights
from trace_batches import traced_batches

from dcar.config import load_config
from dcar.data.sampler import ResumableBatchSampler
from dcar.train import read_metrics

TRACE = str(ROOT / "tests" / "trace_batches.py")
TOK = [*TOKENIZER_TINY, "stage=warmup", "optim.schedule=constant", "train.ckpt_every=3"]
TOK_STEPS = 6


def _trace(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (run_dir / f"batches.rank{rank}.jsonl").read_text().splitlines()]


def _in_process(trainer_cls: type, cfg_cls: type, args: list[str]) -> dict[str, torch.Tensor]:
    """A one-process reference run in this process (batches traced too); returns its initial model weights."""
    from accelerate import Accelerator

    trainer = trainer_cls(load_config(cfg_cls, args), accelerator=Accelerator(cpu=True), argv=["test"])
    trainer.batches = types.MethodType(traced_batches, trainer)
    trainer.setup()
    init = {k: v.detach().clone() for k, v in trainer.export_model().state_dict().items()}
    trainer.fit()
    return init


def _check_same_training(two: Path, one: Path, init: dict[str, torch.Tensor], steps: int) -> None:
    """Same weights (float tolerance), same logged losses, and per step rank 0's then rank 1's samples are exactly
    the one-process batch (no duplicates, no gaps), every step consumed once."""
    w2, w1 = weights(two / "final" / "model.safetensors"), weights(one / "final" / "model.safetensors")
    assert max_abs_diff(w1, {k: init[k] for k in w1}) > 1e-3  # training moved the weights ...
    assert max_abs_diff(w2, w1) < 1e-5  # ... identically with 2 x b and 1 x 2b
    ranks, ref = [_trace(two, r) for r in (0, 1)], _trace(one, 0)
    for rows in (*ranks, ref):
        assert [r["micro_step"] for r in rows] == list(range(steps))
    for s in range(steps):
        a, b = ranks[0][s]["index"], ranks[1][s]["index"]
        assert not set(a) & set(b) and a + b == ref[s]["index"], s
    seen = [i for r in ref for i in r["index"]]
    assert len(set(seen)) == len(seen)  # less than one epoch: no sample twice
    # metrics.jsonl of the 2-process run holds means over processes: the one-process numbers
    rows2, rows1 = read_metrics(two / "metrics.jsonl"), read_metrics(one / "metrics.jsonl")
    assert [r["step"] for r in rows2] == [r["step"] for r in rows1] == list(range(1, steps + 1))
    for r2, r1 in zip(rows2, rows1, strict=True):
        assert r2["loss"] == pytest.approx(r1["loss"], rel=1e-4), r2["step"]


@pytest.fixture(scope="module")
def tokenizer_runs(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """The tokenizer warm-up: 2 processes x batch 4 (``accelerate launch --multi_gpu``), 1 process x batch 8."""
    from dcar.train.tokenizer import TokenizerTrainConfig, TokenizerTrainer

    root = tmp_path_factory.mktemp("tok_dist")
    two, one = root / "two", root / "one"
    args = [*TOK, "train.batch_size=4", f"train.steps={TOK_STEPS}", f"run.dir={two}"]
    run(accelerate_cmd(TRACE, ["scripts/train_tokenizer.py", *args]), cwd=ROOT)
    init = _in_process(TokenizerTrainer, TokenizerTrainConfig,
                       [*TOK, "train.batch_size=8", f"train.steps={TOK_STEPS}", f"run.dir={one}"])
    return two, one, init


def test_tokenizer_two_processes_equal_one_with_double_batch(tokenizer_runs):
    two, one, init = tokenizer_runs
    _check_same_training(two, one, init, TOK_STEPS)
    meta = json.loads((two / "checkpoints" / f"step_{TOK_STEPS:08d}" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["samples_seen"] == TOK_STEPS * 8


@pytest.mark.slow
def test_tokenizer_two_processes_resume_exactly(tokenizer_runs, tmp_path):
    """3 steps, a new 2-process launch that resumes, 3 more: bit-equal to the straight 2-process run, and the
    resumed ranks continue the sample stream where it stopped."""
    two, one, init = tokenizer_runs
    split = tmp_path / "split"
    args = [*TOK, "train.batch_size=4", f"run.dir={split}"]
    run(accelerate_cmd(TRACE, ["scripts/train_tokenizer.py", *args, "train.steps=3"]), cwd=ROOT)
    second = run(accelerate_cmd(TRACE, ["scripts/train_tokenizer.py", *args, f"train.steps={TOK_STEPS}"]), cwd=ROOT)
    assert "step_00000003 at step 3" in second.stderr
    a, b = weights(split / "final" / "model.safetensors"), weights(two / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    _check_same_training(split, one, init, TOK_STEPS)


GEN_DETERMINISTIC = [
    f"config={ROOT}/configs/generator/shapes.yaml", "data.kind=shapes", "data.resolution=64", "model.image_size=64",
    "model.pos_base_size=2", "model.num_layers=2", "model.width=64", "model.num_heads=2", "model.codebook_size=64",
    "model.use_head=false", "caption_dropout=0", "model.train_mask_ratio=truncnorm", "model.train_mask_ratio_min=0.99",
    "train.log_every=1", "log.progress=false", "num_preview=0", "optim.lr=2e-3", "optim.schedule=constant",
    "optim.warmup_steps=0", "train.steps=4", "train.ckpt_every=4",
    # the attention key bias has a zero gradient up to rounding (softmax ignores a shift of all keys); with Adam's
    # default eps that rounding noise becomes +-lr steps of random sign: eps=1e-3 keeps updates proportional
    "optim.eps=1e-3",
    "text_encoder.t5_config={d_model: 128, d_kv: 32, d_ff: 128, num_layers: 1, num_heads: 2}",
]


@pytest.mark.slow
def test_generator_two_processes_equal_one_with_double_batch(tmp_path):
    from dcar.models.tokenizer import build_tokenizer
    from dcar.train.generator import GeneratorTrainConfig, GeneratorTrainer

    tokenizer = tmp_path / "tokenizer"
    torch.manual_seed(0)
    build_tokenizer({"model": {  # a tiny random DC-HT: 64 codes, 2x2 tokens at 64 px
        "encoder_block_out_channels": [8, 8, 16, 32, 32, 32], "decoder_block_out_channels": [8, 8, 16, 32, 32, 32],
        "encoder_layers_per_block": [0, 1, 1, 1, 1, 1], "decoder_layers_per_block": [0, 1, 1, 1, 1, 1],
        "quantizer": {"codebook_size": 64}}}).save_pretrained(tokenizer)
    common = [*GEN_DETERMINISTIC, f"tokenizer={tokenizer}"]
    two, one = tmp_path / "two", tmp_path / "one"
    run(torchrun_cmd(TRACE, ["scripts/train_generator.py", *common, "train.batch_size=4", f"run.dir={two}"]),
        cwd=ROOT)
    init = _in_process(GeneratorTrainer, GeneratorTrainConfig, [*common, "train.batch_size=8", f"run.dir={one}"])
    _check_same_training(two, one, init, steps=4)
    assert (two / "pipeline" / "pipeline.json").is_file()  # the sampling pipeline, written by the main process


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_rank_batches_split_the_one_process_stream_after_resume(tmp_path, grad_accum):
    """Trainer.batches of every rank (2 or 4 ranks, fresh or resumed at step 5) split the 1-process stream: each
    micro-step's shares concatenate to the global batch, and every epoch is seen exactly once."""
    from dcar.config import TrainConfig
    from dcar.train import Trainer

    class Ranked(Trainer):  # only what batches() needs: the data, the rank and the data position
        def build_modules(self):
            raise NotImplementedError

        def build_dataset(self):
            raise NotImplementedError

        def train_step(self, batch, step):
            raise NotImplementedError

    class Index(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 29

        def __getitem__(self, i: int) -> dict:
            return {"index": i}

    cfg = load_config(TrainConfig, [f"run.dir={tmp_path}", "train.batch_size=3", f"train.grad_accum={grad_accum}"])

    def shares(rank: int, world: int, step: int, count: int) -> list[list[int]]:
        acc = types.SimpleNamespace(process_index=rank, num_processes=world, device=torch.device("cpu"))
        trainer = Ranked(cfg, accelerator=acc)
        trainer.dataset, trainer.step = Index(), step
        data = trainer.batches()
        return [next(data)["index"].tolist() for _ in range(count)]

    stream = ResumableBatchSampler(29, 1, seed=cfg.data.seed)
    micro = 12 * grad_accum
    for world in (2, 4):
        full = stream.global_indices(0, micro * 3 * world)
        for e in range(len(full) // 29):
            assert sorted(full[29 * e: 29 * (e + 1)]) == list(range(29))  # no duplicates, no gaps per epoch
        for resume_step in (0, 5):
            start = resume_step * grad_accum
            per_rank = [shares(r, world, resume_step, micro - start) for r in range(world)]
            got = [i for m in range(micro - start) for r in range(world) for i in per_rank[r][m]]
            assert got == full[start * 3 * world:], (world, resume_step)
