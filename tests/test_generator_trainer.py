"""DC-AR generator training on a frozen DC-HT: learning, exact resume, discrete-only, residual-scale estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcar.config import ConfigError, load_config
from dcar.models.generator import DCAR
from dcar.models.tokenizer import build_tokenizer
from dcar.train.generator import GeneratorTrainConfig, GeneratorTrainer

ROOT = Path(__file__).resolve().parents[1]
GEN = [
    f"config={ROOT}/configs/generator/shapes.yaml", "data.kind=shapes", "data.resolution=64", "model.image_size=64",
    "model.pos_base_size=2", "model.num_layers=2", "model.width=64", "model.num_heads=2", "model.codebook_size=64",
    "model.head.width=32", "model.head.depth=1", "train.batch_size=16",
    "train.log_every=1", "log.progress=false", "num_preview=0", "optim.lr=2e-3", "optim.schedule=constant",
    "text_encoder.t5_config={d_model: 128, d_kv: 32, d_ff: 128, num_layers: 1, num_heads: 2}",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A tiny random DC-HT (64 codes) saved with save_pretrained: the frozen tokenizer of these tests."""
    cfg = {"model": {
        "encoder_block_out_channels": [8, 8, 16, 32, 32, 32], "decoder_block_out_channels": [8, 8, 16, 32, 32, 32],
        "encoder_layers_per_block": [0, 1, 1, 1, 1, 1], "decoder_layers_per_block": [0, 1, 1, 1, 1, 1],
        "quantizer": {"codebook_size": 64}}}
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tok") / "final"
    build_tokenizer(cfg).save_pretrained(path)
    return path


def _run(tmp_path: Path, tokenizer_dir: Path, name: str, *extra: str) -> GeneratorTrainer:
    from accelerate import Accelerator

    cfg = load_config(GeneratorTrainConfig, [*GEN, f"tokenizer={tokenizer_dir}", f"run.dir={tmp_path / name}", *extra])
    trainer = GeneratorTrainer(cfg, accelerator=Accelerator(cpu=True), argv=["test"])
    trainer.fit()
    return trainer


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_and_final_model_loads(tmp_path, tokenizer_dir):
    _run(tmp_path, tokenizer_dir, "a", "train.steps=30", "train.ckpt_every=30")
    rows = _rows(tmp_path / "a")
    last = rows[-10:]
    assert sum(r["loss/ce"] for r in last) / 10 < 0.8 * rows[0]["loss/ce"]  # from ~ln(64) to well below
    assert sum(r["token_acc"] for r in last) / 10 > 0.2  # chance: 1/64
    assert all("loss/diffusion" in r and r["loss/diffusion"] > 0 for r in rows)
    gen = DCAR.from_pretrained(tmp_path / "a" / "final")
    assert gen.config.head.residual_scale not in (0.0, 1.0)  # estimated from the tokenizer's residuals, recorded
    assert (tmp_path / "a" / "text_tokenizer" / "tokenizer.json").is_file()


def test_exact_resume(tmp_path, tokenizer_dir):
    common = ["train.ckpt_every=3", "train.ema_decay=0.9"]
    _run(tmp_path, tokenizer_dir, "straight", *common, "train.steps=6")
    _run(tmp_path, tokenizer_dir, "split", *common, "train.steps=3")
    _run(tmp_path, tokenizer_dir, "split", *common, "train.steps=6")
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_compiled_training_equals_eager_and_saves_plain_weights(tmp_path, tokenizer_dir):
    """train.compile=true (aot_eager: dynamo + AOT autograd, no code generation) trains the same steps as eager, and
    the checkpoints, the final model and a resume see the plain module's weights (no torch.compile prefixes)."""
    common = ["train.ckpt_every=2", "train.ema_decay=0.9", "train.steps=4"]
    _run(tmp_path, tokenizer_dir, "eager", *common)
    compiled = ["train.compile=true", "train.compile_backend=aot_eager"]
    trainer = _run(tmp_path, tokenizer_dir, "compiled", *common[:2], "train.steps=2", *compiled)
    assert isinstance(trainer.modules["model"], torch._dynamo.eval_frame.OptimizedModule)
    _run(tmp_path, tokenizer_dir, "compiled", *common, *compiled)  # resumed from step 2
    eager, comp = _rows(tmp_path / "eager"), _rows(tmp_path / "compiled")
    assert [r["step"] for r in comp] == [1, 2, 3, 4]
    for key in ("loss", "loss/ce", "loss/diffusion", "grad_norm/model"):
        assert [r[key] for r in comp] == pytest.approx([r[key] for r in eager], rel=1e-5, abs=1e-6), key
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "eager" / "checkpoints" / "step_00000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "compiled" / "checkpoints" / "step_00000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), name
    assert DCAR.from_pretrained(tmp_path / "compiled" / "final").state_dict().keys() == \
        DCAR.from_pretrained(tmp_path / "eager" / "final").state_dict().keys()
    # another batch size in the same process compiles again with static shapes (a symbolic batch would break the
    # mask sampling)
    _run(tmp_path, tokenizer_dir, "batch8", "train.steps=1", "train.batch_size=8", *compiled)
    assert _rows(tmp_path / "batch8")[0]["loss"] > 0


def test_discrete_only_has_no_head(tmp_path, tokenizer_dir):
    _run(tmp_path, tokenizer_dir, "d", "model.use_head=false", "train.steps=3", "train.ckpt_every=3")
    rows = _rows(tmp_path / "d")
    assert all("loss/diffusion" not in r for r in rows)
    gen = DCAR.from_pretrained(tmp_path / "d" / "final")
    assert gen.head is None and not any(k.startswith("head.") for k in gen.state_dict())


def test_tokenizer_is_required():
    from accelerate import Accelerator

    cfg = load_config(GeneratorTrainConfig, GEN)
    with pytest.raises(ConfigError, match="tokenizer=PATH is required"):
        GeneratorTrainer(cfg, accelerator=Accelerator(cpu=True))
