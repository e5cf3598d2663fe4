"""DC-HT's three-stage trainer: stage semantics, exact resume with the GAN on, learning, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dcar.config import load_config
from dcar.train.tokenizer import STAGES, TokenizerTrainConfig, TokenizerTrainer, mix_latents

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "config=configs/tokenizer/shapes.yaml",
    "model.encoder_block_out_channels=[8,8,16,32,32,32]", "model.decoder_block_out_channels=[8,8,16,32,32,32]",
    "model.encoder_layers_per_block=[0,1,1,1,1,1]", "model.decoder_layers_per_block=[0,1,1,1,1,1]",
    "model.quantizer.codebook_size=64", "data.resolution=64", "train.batch_size=8", "train.log_every=1",
    "log.progress=false", "optim.warmup_steps=0", "codebook_init_images=64", "merge_codes_images=64",
]


def _cfg(tmp_path: Path, name: str, *extra: str) -> TokenizerTrainConfig:
    argv = [a.replace("configs/", f"{ROOT}/configs/") for a in TINY]
    return load_config(TokenizerTrainConfig, [*argv, f"run.dir={tmp_path / name}", *extra])


def _trainer(cfg: TokenizerTrainConfig) -> TokenizerTrainer:
    from accelerate import Accelerator

    return TokenizerTrainer(cfg, accelerator=Accelerator(cpu=True), argv=["test"])


def _train(cfg: TokenizerTrainConfig) -> TokenizerTrainer:
    trainer = _trainer(cfg)
    trainer.fit()
    return trainer


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_mix_latents_paths():
    z, zq = torch.randn(400, 2, 1, 1), torch.randn(400, 2, 1, 1)
    assert torch.equal(mix_latents(z, zq, 1.0)[0], z) and torch.equal(mix_latents(z, zq, 0.0)[0], zq)
    torch.manual_seed(0)
    mixed, pick = mix_latents(z, zq, 0.5)
    assert torch.equal(mixed[pick], z[pick]) and torch.equal(mixed[~pick], zq[~pick])
    assert 0.42 < pick.float().mean() < 0.58
    assert STAGES["alternate"].p_continuous == 0.5 and not STAGES["alternate"].train_encoder


def test_three_stages_semantics_and_learning(tmp_path):
    warm = _trainer(_cfg(tmp_path, "warmup", "stage=warmup", "train.steps=40", "train.ckpt_every=40"))
    warm.setup()
    codebook0 = warm.unwrap("model").tokenizer.quantizer.embedding.weight.detach().clone()
    warm.fit()
    rows = _rows(tmp_path / "warmup")
    assert all(r["frac_continuous"] == 1.0 for r in rows)
    assert sum(r["loss"] for r in rows[-5:]) < 0.7 * sum(r["loss"] for r in rows[:5])  # it learns
    w_final = load_file(str(tmp_path / "warmup" / "final" / "model.safetensors"))
    assert torch.equal(w_final["quantizer.embedding.weight"], codebook0)  # the warm-up never trains the codebook

    _train(_cfg(tmp_path, "discrete", "stage=discrete", "train.steps=20", "train.ckpt_every=20",
                f"init_from={tmp_path / 'warmup' / 'final'}"))
    rows = _rows(tmp_path / "discrete")
    assert all(r["frac_continuous"] == 0.0 for r in rows) and all("loss/vq" in r and r["loss/vq"] > 0 for r in rows)
    d_final = load_file(str(tmp_path / "discrete" / "final" / "model.safetensors"))
    assert not torch.equal(d_final["quantizer.embedding.weight"], w_final["quantizer.embedding.weight"])

    _train(_cfg(tmp_path, "alternate", "stage=alternate", "train.steps=20", "train.ckpt_every=20",
                f"init_from={tmp_path / 'discrete' / 'final'}"))
    rows = _rows(tmp_path / "alternate")
    frac = sum(r["frac_continuous"] for r in rows) / len(rows)
    assert 0.35 < frac < 0.65 and any(0 < r["frac_continuous"] < 1 for r in rows)
    a_final = load_file(str(tmp_path / "alternate" / "final" / "model.safetensors"))
    for key, value in d_final.items():
        if key.startswith(("encoder.", "quantizer.embedding")):
            assert torch.equal(value, a_final[key]), f"{key} changed in the alternate stage"
    changed = [k for k in d_final if k.startswith("decoder.") and not torch.equal(d_final[k], a_final[k])]
    assert len(changed) > 10  # the decoder trains
    assert (tmp_path / "alternate" / "images" / "recon_00000020.png").is_file()


def test_kmeans_codebook_init_on_init_from(tmp_path):
    _train(_cfg(tmp_path, "warmup", "stage=warmup", "train.steps=4", "train.ckpt_every=4"))
    init = [f"init_from={tmp_path / 'warmup' / 'final'}", "stage=discrete", "train.steps=1"]
    keep = _trainer(_cfg(tmp_path, "keep", *init, "codebook_init=keep"))
    keep.setup()
    km = _trainer(_cfg(tmp_path, "km", *init, "codebook_init=kmeans", "codebook_init_images=64"))
    km.setup()
    tok_keep, tok_km = keep.unwrap("model").tokenizer, km.unwrap("model").tokenizer
    images = torch.stack([km.dataset[i]["image"] for i in range(64)])  # the images k-means saw
    with torch.no_grad():
        z = tok_km.encoder(images).permute(0, 2, 3, 1).reshape(-1, 32)
        err = {name: (t.quantizer.embedding.weight[t.quantizer.nearest_indices(z)] - z).pow(2).mean().item()
               for name, t in (("keep", tok_keep), ("km", tok_km))}
    assert err["km"] < 0.2 * err["keep"]  # centroids of the latents quantise them far better than N(0, 1) codes
    # resuming never re-runs the init: the resumed codebook is the checkpoint's
    km.fit()
    again = _trainer(_cfg(tmp_path, "km", *init, "codebook_init=kmeans", "codebook_init_images=64", "train.steps=2"))
    again.setup()
    assert torch.equal(again.unwrap("model").tokenizer.quantizer.embedding.weight,
                       load_file(str(tmp_path / "km" / "final" / "model.safetensors"))["quantizer.embedding.weight"])
    # k-means rebuilds the codebook, so it may change size; the encoder/decoder weights still come from init_from
    small = _trainer(_cfg(tmp_path, "km16", *init, "codebook_init=kmeans", "codebook_init_images=64",
                          "model.quantizer.codebook_size=16"))
    small.setup()
    tok_small = small.unwrap("model").tokenizer
    assert tok_small.quantizer.embedding.weight.shape == (16, 32)
    warm = load_file(str(tmp_path / "warmup" / "final" / "model.safetensors"))
    assert torch.equal(tok_small.encoder.conv_in.conv.weight, warm["encoder.conv_in.conv.weight"])
    # the same from a training checkpoint (HybridStep keys) instead of a save_pretrained folder
    from_ckpt = _trainer(_cfg(tmp_path, "km16c", f"init_from={tmp_path / 'warmup' / 'checkpoints' / 'step_00000004'}",
                              "stage=discrete", "train.steps=1", "codebook_init=kmeans", "codebook_init_images=64",
                              "model.quantizer.codebook_size=16"))
    from_ckpt.setup()
    tok_c = from_ckpt.unwrap("model").tokenizer
    assert tok_c.quantizer.embedding.weight.shape == (16, 32)
    assert torch.equal(tok_c.encoder.conv_in.conv.weight, warm["encoder.conv_in.conv.weight"])
    size_error = r"mismatched shapes .*quantizer.embedding.weight: file \(64, 32\) vs model \(16, 32\)"
    with pytest.raises(RuntimeError, match=size_error):  # keeping the codebook needs the same size
        _trainer(_cfg(tmp_path, "keep16", *init, "codebook_init=keep", "model.quantizer.codebook_size=16")).setup()


def test_exact_resume_with_gan(tmp_path):
    # constant LR: the LR schedule depends on train.steps, which the interrupted first leg shortens
    gan = ["stage=discrete", "loss.gan_weight=0.5", "loss.disc_start=2", "train.ckpt_every=3", "train.ema_decay=0.9",
           "optim.schedule=constant"]
    _train(_cfg(tmp_path, "straight", *gan, "train.steps=6"))
    _train(_cfg(tmp_path, "split", *gan, "train.steps=3"))
    _train(_cfg(tmp_path, "split", *gan, "train.steps=6"))  # resume=auto picks step 3
    for name in ("model", "ema", "disc"):
        a = load_file(str(tmp_path / "straight" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "split" / "checkpoints" / "step_00000006" / f"{name}.safetensors"))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    rows = _rows(tmp_path / "straight")
    assert rows[-1]["disc/disc_factor"] == 1.0 and "disc/d_loss" in rows[-1]


@pytest.mark.parametrize(("arg", "message"), [
    ("stage=foo", "invalid choice 'foo' for 'stage'; valid choices: alternate, discrete, warmup"),
    ("optim.lrr=1", "unknown key 'optim.lrr' on the command line (did you mean 'optim.lr'?)"),
    ("data=nope", "invalid choice 'nope' for 'data'; valid choices: imagenet, jsonl, shapes, webdataset"),
])
def test_cli_rejects_bad_config_before_building(tmp_path, arg, message):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"),
                           f"config={ROOT}/configs/tokenizer/shapes.yaml", f"run.dir={run}", arg],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not run.exists()  # nothing was built or written


GAN_STEPS = ["stage=discrete", "loss.gan_weight=0.5", "loss.disc_start=2", "optim.schedule=constant",
             "train.log_every=1"]


def _gan_rows(run: Path) -> list[tuple[float, float]]:
    return [(r["loss"], r["loss/d_weight"]) for r in _rows(run) if "loss" in r]


def test_retained_graph_compile_patches_and_restores():
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from dcar.train.runtime import retained_graph_compile

    before = (functorch_config.donated_buffer, inductor_config.inplace_buffers)
    with retained_graph_compile(False):
        assert (functorch_config.donated_buffer, inductor_config.inplace_buffers) == before
    with retained_graph_compile():
        assert (functorch_config.donated_buffer, inductor_config.inplace_buffers) == (False, False)
    assert (functorch_config.donated_buffer, inductor_config.inplace_buffers) == before
    assert TokenizerTrainer.backward_twice


def test_compiled_gan_steps_equal_eager(tmp_path, monkeypatch):
    """train.compile (aot_eager: dynamo + AOT autograd, no code generation) with the GAN and its adaptive weight,
    which differentiates two losses through the compiled graphs before the step's backward, stopped at step 2 and
    resumed: the same losses, adaptive weights and step-4 weights as eager; the loop runs under
    retained_graph_compile, and the checkpoints hold the plain modules' weights."""
    import dcar.train.trainer as trainer_module

    seen = []
    real = trainer_module.retained_graph_compile
    monkeypatch.setattr(trainer_module, "retained_graph_compile", lambda on: seen.append(on) or real(on))
    steps = [*GAN_STEPS, "train.ckpt_every=2"]
    compiled = ["train.compile=true", "train.compile_backend=aot_eager"]
    _train(_cfg(tmp_path, "eager", *steps, "train.steps=4"))
    _train(_cfg(tmp_path, "compiled", *steps, "train.steps=2", *compiled))
    _train(_cfg(tmp_path, "compiled", *steps, "train.steps=4", *compiled))  # resumed from step 2
    assert seen == [False, True, True]
    eager, comp = _gan_rows(tmp_path / "eager"), _gan_rows(tmp_path / "compiled")
    assert len(eager) == 4 and eager[2][1] > 0  # the GAN and its adaptive weight are on from the third step
    for (le, we), (lc, wc) in zip(eager, comp, strict=True):
        assert lc == pytest.approx(le, rel=1e-5) and wc == pytest.approx(we, rel=1e-4, abs=1e-7)
    for name in ("model", "disc"):  # the checkpoints hold the plain modules' weights, equal to eager's
        a, b = (load_file(str(tmp_path / run / "checkpoints" / "step_00000004" / f"{name}.safetensors"))
                for run in ("eager", "compiled"))
        assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
def test_inductor_gan_steps_follow_eager(tmp_path):
    """The same with inductor (~80 s of compilation on 2 cores). Without retained_graph_compile the GAN loss's
    gradient at the decoder's last conv came out ~1e-6 instead of ~4 at the first GAN step (inductor's backward
    reused activations that the second pass still needed), the adaptive weight hit its clamp and the loss diverged."""
    steps = [*GAN_STEPS, "train.steps=4", "train.ckpt_every=4"]
    _train(_cfg(tmp_path, "eager", *steps))
    _train(_cfg(tmp_path, "inductor", *steps, "train.compile=true"))
    eager, ind = _gan_rows(tmp_path / "eager"), _gan_rows(tmp_path / "inductor")
    for (le, we), (li, wi) in zip(eager, ind, strict=True):  # fused kernels round differently: close, not equal
        assert li == pytest.approx(le, rel=1e-2) and wi == pytest.approx(we, rel=2e-2, abs=1e-6)


def test_compile_mode_is_checked(tmp_path):
    from dcar.config import ConfigError
    from dcar.train.generator import GeneratorTrainConfig

    with pytest.raises(ConfigError, match="invalid choice 'fast' for 'train.compile_mode'; valid choices: default, "):
        load_config(GeneratorTrainConfig, [f"config={ROOT}/configs/generator/shapes.yaml", "train.compile_mode=fast"])
    assert _cfg(tmp_path, "c", "train.compile=true").train.compile


def test_merge_codes_at_alternate_start(tmp_path):
    """merge_codes maps synonym codes (same patch) to one index before the alternate stage trains the decoder; the
    map is the one find_synonyms gives on those images, survives training and save/load, and z = zq + residual."""
    from dcar.models.tokenizer import DCHT
    from dcar.models.tokenizer.synonyms import find_synonyms, patchify

    data = ["data.shapes.align=32", "data.shapes.grid=16"]
    _train(_cfg(tmp_path, "warmup", "stage=warmup", "train.steps=4", "train.ckpt_every=4", *data))
    _train(_cfg(tmp_path, "discrete", "stage=discrete", "train.steps=2", "train.ckpt_every=2", "codebook_init=kmeans",
                f"init_from={tmp_path / 'warmup' / 'final'}", *data))
    init = [f"init_from={tmp_path / 'discrete' / 'final'}", "stage=alternate", "train.steps=3", "train.ckpt_every=3",
            "merge_codes_gains=[]", *data]  # synonyms alone (the shapes config also joins brightness variants)
    plain = _trainer(_cfg(tmp_path, "plain", *init, "merge_codes=false"))
    plain.setup()
    assert not plain.unwrap("model").tokenizer.quantizer.merged
    merged = _trainer(_cfg(tmp_path, "merged", *init, "merge_codes=true"))
    merged.setup()
    quantizer = merged.unwrap("model").tokenizer.quantizer
    code_map = quantizer.code_map.clone()
    assert quantizer.merged and torch.equal(code_map[code_map], code_map)  # canonical codes map to themselves
    images = torch.stack([merged.dataset[i]["image"] for i in range(64)])  # the images the merge saw
    tok = merged.unwrap("model").tokenizer
    with torch.no_grad():
        z = tok.encoder(images)
        nearest = quantizer.nearest_indices(z.permute(0, 2, 3, 1).reshape(-1, 32))
    tol = merged.cfg.merge_codes_tol
    assert torch.equal(code_map, find_synonyms(nearest, patchify(images, 32), quantizer.codebook_size, tol))
    merged.fit()
    final = DCHT.from_pretrained(tmp_path / "merged" / "final").eval()
    assert torch.equal(final.quantizer.code_map, code_map)
    with torch.no_grad():
        out = final.encode(images[:8])
    assert torch.equal(out.indices.flatten(), code_map[nearest[: out.indices.numel()]])
    torch.testing.assert_close(out.zq + out.residual, out.z, rtol=0, atol=1e-6)


def test_merge_codes_gains_join_brightness_variants(tmp_path):
    """merge_codes_gains: the merge images are encoded again at each gain, and the map is the union of the synonym
    groups with the brightness pairs (find_gain_synonyms / unite_codes on exactly those codes): canonical codes map
    to themselves and no more codes are emitted than without gains; bad gains are refused by name."""
    from dcar.config import ConfigError
    from dcar.models.tokenizer.synonyms import find_gain_synonyms, find_synonyms, patchify, unite_codes

    data = ["data.shapes.align=32", "data.shapes.grid=16", "data.shapes.exposure=0.12", "data.shapes.lighting=true"]
    _train(_cfg(tmp_path, "warmup", "stage=warmup", "train.steps=4", "train.ckpt_every=4", *data))
    _train(_cfg(tmp_path, "discrete", "stage=discrete", "train.steps=2", "train.ckpt_every=2", "codebook_init=kmeans",
                f"init_from={tmp_path / 'warmup' / 'final'}", *data))
    init = [f"init_from={tmp_path / 'discrete' / 'final'}", "stage=alternate", "train.steps=0", *data,
            "merge_codes=true", "merge_codes_gain_purity=0.6"]
    plain = _trainer(_cfg(tmp_path, "plain", *init, "merge_codes_gains=[]"))
    plain.setup()
    lit = _trainer(_cfg(tmp_path, "lit", *init, "merge_codes_gains=[0.88]"))
    lit.setup()
    quantizer = lit.unwrap("model").tokenizer.quantizer
    code_map = quantizer.code_map.clone()
    images = torch.stack([lit.dataset[i]["image"] for i in range(64)])
    tok = lit.unwrap("model").tokenizer

    def nearest(x):
        with torch.no_grad():
            z = tok.encoder(x)
            return quantizer.nearest_indices(z.permute(0, 2, 3, 1).reshape(-1, 32))

    base, dim = nearest(images), nearest((images + 1) * 0.88 - 1)
    synonyms = find_synonyms(base, patchify(images, 32), 64, lit.cfg.merge_codes_tol)
    assert torch.equal(plain.unwrap("model").tokenizer.quantizer.code_map, synonyms)
    edges = find_gain_synonyms(base, dim, 64, 0.6)
    assert edges.numel() > 0  # the dimmed images move some tokens to other codes, consistently
    assert torch.equal(code_map, unite_codes(synonyms, edges, torch.bincount(base, minlength=64)))
    assert torch.equal(code_map[code_map], code_map)
    assert code_map[base].unique().numel() <= synonyms[base].unique().numel()
    for bad, key in (("merge_codes_gains=[1.0]", "merge_codes_gains"), ("merge_codes_gain_purity=0.4",
                                                                        "merge_codes_gain_purity")):
        with pytest.raises(ConfigError, match=key):
            _cfg(tmp_path, "bad", bad)
